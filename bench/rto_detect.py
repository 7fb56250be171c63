"""bench_rto's third contender: oneha with its own detection (issue 13), on a lab with every host's management side.

Every process is real: the lab (production timelines) with its host side (sshd/libvirtd listeners on 127.50.x.y,
Redfish BMCs from sushy-tools, each host's agent modelled by the agent's own core with its watchdog), Redis, two
`oneha detect` instances (quorum 2, each probing from its own 127.60.0.x address and serving its beacon there), the
subscriber and two Celery workers. Fencing is the shipped `deploy/fence/fence_redfish.sh` against the lab's BMCs.
Failure modes: `psu` (the power supply fails, the BMC answers "Off") and `power_loss` (BMC dead too: only the storage
heartbeat, stale past the agent's self-fence deadline, can prove death).

The lab's host side is one per process (the sushy-tools app is a singleton) and binds the hosts' fixed addresses, so
these runs take turns (`_ONE_AT_A_TIME`); the other contenders run beside them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import redis

from bench.rto_lab import (
    Run,
    cut_power,
    make_lab,
    profile_factor,
    read_lab_marks,
    stop_processes,
    wait_recovered,
    write_oneha_config,
)
from oneha.incidents import IncidentStore, Kind
from oneha.keys import Keys
from oneha.lab.hostside import HostSideOptions
from oneha.lab.sim import LabCloud
from oneha.lab.timeline import Profile
from oneha.redis_server import RedisServer
from oneha.waiting import wait_until

FENCE_REDFISH = Path(__file__).resolve().parent.parent / "deploy" / "fence" / "fence_redfish.sh"
DETECTORS = [("127.60.0.1", 9650), ("127.60.0.2", 9650)]
_ONE_AT_A_TIME = threading.Lock()


def detection_timings(quick: bool) -> dict[str, float]:
    """oneha's defaults (detect.* and the agent's), or 1/5 of them for --quick (the lab's timers run 20x faster
    there; detection is kept slower than that so the probes stay meaningful on 2 loaded cores)."""
    f = 0.2 if quick else 1.0
    return {"probe_interval_s": 1.0 * f, "probe_timeout_s": 0.8 * f, "alive_ttl_s": 3.0 * f,
            "decision_lease_s": 15.0 * f, "decision_retry_s": 30.0 * f, "hosts_refresh_s": 5.0 * f,
            "heartbeat_stale_s": 25.0 * f, "heartbeat_margin_s": 4.0 * f, "heartbeat_fresh_s": 5.0 * f,
            "beat_s": 1.0 * f, "loss_timeout_s": 10.0 * f, "watchdog_timeout_s": 10.0 * f}


def detect_section(lab: LabCloud, t: dict[str, float]) -> str:
    assert lab.host_side is not None
    return f"""[detect]
probe_interval_s = {t["probe_interval_s"]}
probe_timeout_s = {t["probe_timeout_s"]}
alive_ttl_s = {t["alive_ttl_s"]}
decision_lease_s = {t["decision_lease_s"]}
decision_retry_s = {t["decision_retry_s"]}
hosts_refresh_s = {t["hosts_refresh_s"]}
heartbeat_dir = "{lab.host_side.heartbeat_dir}"
heartbeat_stale_s = {t["heartbeat_stale_s"]}
heartbeat_margin_s = {t["heartbeat_margin_s"]}
heartbeat_fresh_s = {t["heartbeat_fresh_s"]}
metrics_port = 0
"""


def host_side_options(t: dict[str, float]) -> HostSideOptions:
    return HostSideOptions(heartbeat_s=t["beat_s"], loss_timeout_s=t["loss_timeout_s"],
                           watchdog_timeout_s=t["watchdog_timeout_s"], detectors=list(DETECTORS))


def child_env(config: Path, cred_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
    env.update(PYTHONUNBUFFERED="1", ONEHA_CONFIG=str(config), ONEHA_FENCE_CRED_DIR=str(cred_dir))
    return env


def start_processes(env: dict[str, str], log_path: Path) -> list[subprocess.Popen[bytes]]:
    log = log_path.open("wb")
    procs = []
    argvs: list[tuple[list[str], dict[str, str]]] = [([sys.executable, "-m", "oneha", "subscribe"], {})]
    argvs += [([sys.executable, "-m", "oneha", "worker", "--concurrency", "16", "--loglevel", "WARNING",
                "--hostname", f"rtod{i}@local"], {}) for i in range(2)]
    argvs += [([sys.executable, "-m", "oneha", "detect"],
               {"ONEHA_DETECT__INSTANCE": f"bench-d{i}", "ONEHA_DETECT__BEACON_BIND": addr,
                "ONEHA_DETECT__BEACON_PORT": str(port), "ONEHA_DETECT__PROBE_SOURCE_ADDRESS": addr})
              for i, (addr, port) in enumerate(DETECTORS)]
    for argv, extra in argvs:
        procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env={**env, **extra}, start_new_session=True))
    return procs


def detect_marks(store: IncidentStore, failed: list[int], cut: float) -> dict[str, float | None]:
    """Proven dead (the incident's proof), fenced, and every action issued, from the incidents themselves."""
    incidents = [i for i in store.recent(200) if i.kind == Kind.HOST and i.resource_id in failed]
    proven = [float(i.extra["proven_dead_at"]) for i in incidents if i.extra.get("proven_dead_at")]
    fenced = [float(i.extra["fenced_at"]) for i in incidents if i.extra.get("fenced_at")]
    acted = [r["acted_at"] for i in incidents for r in store.vm_records(i.id).values() if r.get("acted_at")]

    def latest(times: list[float], need: int) -> float | None:
        return max(times) - cut if len(times) >= need and times else None

    return {"proven": latest(proven, len(failed)), "fenced": latest(fenced, len(failed)),
            "issued": latest(acted, 1), "_incidents": float(len(incidents)), "_actions": float(len(acted))}


def run_detect(profile: Profile, run: Run, timeout_s: float) -> Run:
    factor = profile_factor(profile)
    t = detection_timings(quick=factor < 1)
    with _ONE_AT_A_TIME, tempfile.TemporaryDirectory() as tmp:
        lab = make_lab(profile, host_side_options(t))
        server = RedisServer.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            assert lab.host_side is not None
            cfg = write_oneha_config(Path(tmp), server.url, lab, factor, [str(FENCE_REDFISH)], detect_section(lab, t))
            client = redis.Redis.from_url(server.url, decode_responses=True)
            keys = Keys()
            store = IncidentStore(client, keys)
            procs = start_processes(child_env(cfg, lab.host_side.cred_dir), Path(tmp) / "oneha.log")
            wait_until(lambda: len(client.hkeys(keys.heartbeat)) >= 3, 60, what="subscriber and workers ready")
            wait_until(lambda: all(client.exists(keys.detect_view(f"bench-d{i}")) for i in range(len(DETECTORS))),
                       60, what="both detectors probing")
            cut_power(lab, run)
            wait_recovered(lab, run, timeout_s)
            marks = detect_marks(store, run.failed, run.cut)
            run.marks.update({k: v for k, v in marks.items() if not k.startswith("_")})
            run.note = f"{int(marks['_incidents'] or 0)} incident(s), {int(marks['_actions'] or 0)} actions"
            read_lab_marks(lab, run)
            return run
        finally:
            stop_processes(procs)
            lab.stop()
            server.stop()
