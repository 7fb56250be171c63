"""RTO bench: from a host's power cut to every one of its VMs running elsewhere, as the user waits for it.

    .venv/bin/python -m bench.bench_rto [--quick] [--only 1] [--contenders oneha,one-r-p2]

The lab plays OpenNebula's own timelines (lab/timeline.py, profile `production`: monitord's 180 s interval on a
15 s timer and a failing SSH start_monitor, the VMM cleanup on the dead host, the scheduler's window, its 60 s retry
and the plan manager's one action per host per 15 s). Scenarios: 1 host with 50 VMs, and 4 hosts (200 VMs) losing
power at once, in a cloud of 12 hosts x 50 VMs (capacity 200 each). Contenders, each on its own lab, all running at
the same time (the figures are waits, not CPU):
- `one-r-p2`: OpenNebula alone: monitord sets ERROR, the `host_error.rb -r -p 2` hook (bench/baseline_host_error.py:
  sleeps 2 x 60 s, re-reads the host, fences — assumed to work —, `recover 4` per VM), oned's scheduler places them.
- `one-m-p5`: the same with `-m -p 5`, the documented registration (`resched` per VM: a cold migration from UNKNOWN).
- `oneha`: oneha as it is today (its defaults: 60 s host grace, 30 s reconcile), real subscriber on the lab's ZeroMQ
  events + two real Celery workers, reacting to oned's ERROR; fencing assumed to work (`true`), action `recreate`.
Printed per contender: power cut -> ERROR -> fenced -> all actions issued -> all PENDING -> all placed (deploy or
migrate started by the plan manager) -> all RUNNING elsewhere (the lab's truth), duplicates and lost VMs.
`--quick` runs the same on production/20 (every duration / 20; the hook's sleep and oneha's grace/reconcile too).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.baseline_host_error import host_error
from oneha.incidents import IncidentStore, Kind
from oneha.keys import Keys
from oneha.lab.sim import LabCloud
from oneha.lab.timeline import Profile, profile_named
from oneha.opennebula import HostState
from oneha.redis_server import RedisServer
from oneha.settings import ClusterPolicy, SubscriberSettings
from oneha.waiting import wait_until

HOSTS = 12
PER_HOST = 50
FENCE = ["true"]  # fencing assumed to work: the bench measures the wait, not a BMC
MILESTONES = ["ERROR", "fenced", "issued", "PENDING", "placed", "RUNNING"]


@dataclass
class Run:
    contender: str
    failed: list[int]
    vms: list[int] = field(default_factory=list)
    cut: float = 0.0  # wall time of the power cut
    marks: dict[str, float | None] = field(default_factory=dict)  # milestone -> seconds after the cut
    duplicates: int = 0
    lost: int = 0
    note: str = ""


def make_lab(profile: Profile) -> LabCloud:
    lab = LabCloud(hosts=HOSTS, vms=HOSTS * PER_HOST, capacity=PER_HOST * 4, profile=profile, tick_s=0.02)
    return lab.start(port=0, events_port=0)


def cut_power(lab: LabCloud, run: Run) -> None:
    """Cut at the same phase of the lab's timers for every contender (1 s after a beacon slot of host 0 and a
    monitord tick), so that their detection times are the same and the rest of the timelines compare."""
    timing = lab.cloud.timing
    assert timing is not None
    period = 2 * timing.p.manager_timer_s  # = BEACON_HOST on the production profile
    offset = timing.p.manager_timer_s / 15.0
    start = timing.started + offset
    at = start + period * max(0, -(-(lab.cloud.clock() - start) // period))
    wait_until(lambda: lab.cloud.clock() >= at, period + 5, interval_s=0.01, backoff=1.0, what="the cut's phase")
    with lab.cloud.lock:
        run.vms = [v for h in run.failed for v in sorted(lab.cloud.hosts[h].vm_ids)]
        run.cut = time.time()
        for h in run.failed:
            lab.cloud.host_kill(h)


def all_running_elsewhere(lab: LabCloud, run: Run) -> bool:
    failed = set(run.failed)
    with lab.cloud.lock:
        return all((r := lab.cloud.running.get(v)) and not (r & failed) for v in run.vms)


def wait_recovered(lab: LabCloud, run: Run, timeout_s: float) -> None:
    wait_until(lambda: all_running_elsewhere(lab, run), timeout_s, interval_s=0.1, backoff=1.0,
               what=f"{run.contender}: every VM running elsewhere")


def read_lab_marks(lab: LabCloud, run: Run) -> None:
    """ERROR, PENDING, placed and RUNNING from the lab's own records; duplicates and lost from its oracle."""
    cloud = lab.cloud
    with cloud.lock:
        timing = cloud.timing
        assert timing is not None
        mono_to_wall = time.time() - cloud.clock()
        first: dict[tuple[str, int, str], float] = {}
        for t, kind, oid, name in cloud.timeline:
            if t >= run.cut:
                first.setdefault((kind, oid, name), t)
        last_running = {oid: t for t, kind, oid, name in cloud.timeline
                        if t >= run.cut and kind == "vm" and name == "ACTIVE/RUNNING"}
        placed: dict[int, float] = {}
        for t, what, oid in timing.events:
            if what == "action_start" and t + mono_to_wall >= run.cut:
                placed.setdefault(oid, t + mono_to_wall)
        oracle = cloud.oracle()

    def latest(times: list[float | None]) -> float | None:
        return None if not times or any(t is None for t in times) else max(t for t in times if t) - run.cut

    run.marks["ERROR"] = latest([first.get(("host", h, "ERROR")) for h in run.failed])
    run.marks["PENDING"] = latest([first.get(("vm", v, "PENDING")) for v in run.vms])
    run.marks["placed"] = latest([placed.get(v) for v in run.vms])
    run.marks["RUNNING"] = latest([last_running.get(v) for v in run.vms])
    run.duplicates = len(oracle["duplicates"])
    run.lost = len(set(oracle["lost"]) & set(run.vms))


# ------------------------------------------------------------------------------------------------------------
# OpenNebula alone: the host_error hook fires when a host enters ERROR

def run_opennebula(profile: Profile, run: Run, action: str, periods: int, timeout_s: float) -> Run:
    lab = make_lab(profile)
    try:
        cut_power(lab, run)
        hook_marks: list[dict[str, float]] = []

        def hook(h: int) -> int:
            wait_until(lambda: lab.cloud.hosts[h].state == HostState.ERROR, timeout_s, interval_s=0.05,
                       backoff=1.0, what=f"host {h} ERROR")
            marks: dict[str, float] = {}
            hook_marks.append(marks)
            # -p N: N monitoring cycles of 60 s (host_error.rb can no longer read the interval, REFERENCE §1)
            return host_error(lab.rpc_url, lab.session, h, action, FENCE, periods * 60.0 * profile_factor(profile),
                              marks)

        with ThreadPoolExecutor(max_workers=15) as pool:  # the hook manager runs up to 15 hooks at once
            issued = sum(pool.map(hook, run.failed))
        run.marks["fenced"] = max(m["fenced"] for m in hook_marks) - run.cut if hook_marks else None
        run.marks["issued"] = max(m["issued"] for m in hook_marks) - run.cut if hook_marks else None
        run.note = f"{issued} actions"
        wait_recovered(lab, run, timeout_s)
        read_lab_marks(lab, run)
        return run
    finally:
        lab.stop()


def profile_factor(profile: Profile) -> float:
    return profile.manager_timer_s / 15.0


# ------------------------------------------------------------------------------------------------------------
# oneha as it is today: subscriber + workers react to oned's ERROR event

def write_config(directory: Path, redis_url: str, lab: LabCloud, factor: float) -> Path:
    auth = directory / "one_auth"
    auth.write_text(lab.session + "\n")
    auth.chmod(0o600)
    grace = ClusterPolicy().host_grace_s * factor  # oneha's defaults, scaled with the lab's profile
    reconcile = SubscriberSettings().reconcile_interval_s * factor
    path = directory / "oneha.toml"
    path.write_text(f"""
[redis]
url = "{redis_url}"
[oned]
endpoint = "{lab.rpc_url}"
auth_file = "{auth}"
[subscriber]
zmq_endpoints = ["{lab.events_url}"]
reconcile_interval_s = {reconcile}
metrics_port = 0
[worker]
metrics_port = 0
[policy.default]
host_action = "recreate"
host_grace_s = {grace}
fencing = ["{FENCE[0]}"]
""")
    return path


def run_oneha(profile: Profile, run: Run, timeout_s: float) -> Run:
    lab = make_lab(profile)
    server = RedisServer.start()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import redis

            cfg = write_config(Path(tmp), server.url, lab, profile_factor(profile))
            client = redis.Redis.from_url(server.url, decode_responses=True)
            keys = Keys()
            store = IncidentStore(client, keys)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
            env.update(PYTHONUNBUFFERED="1", ONEHA_CONFIG=str(cfg))
            log = (Path(tmp) / "oneha.log").open("wb")
            argvs = [[sys.executable, "-m", "oneha", "subscribe"]] + [
                [sys.executable, "-m", "oneha", "worker", "--concurrency", "16", "--loglevel", "WARNING",
                 "--hostname", f"rto{i}@local"] for i in range(2)]
            for argv in argvs:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True))
            wait_until(lambda: len(client.hkeys(keys.heartbeat)) >= 3, 60, what="subscriber and workers ready")
            cut_power(lab, run)
            wait_recovered(lab, run, timeout_s)
            incidents = [i for i in store.recent(200) if i.kind == Kind.HOST and i.resource_id in run.failed]
            fenced = [e["t"] for i in incidents for e in store.log(i.id) if e.get("event") == "fence"]
            acted = [r["acted_at"] for i in incidents for r in store.vm_records(i.id).values() if r.get("acted_at")]
            run.marks["fenced"] = max(fenced) - run.cut if len(fenced) >= len(run.failed) else None
            run.marks["issued"] = max(acted) - run.cut if len(acted) >= len(run.vms) else None
            run.note = f"{len(incidents)} incident(s), {len(acted)} actions"
            read_lab_marks(lab, run)
            return run
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            lab.stop()
            server.stop()


CONTENDERS: dict[str, Callable[[Profile, Run, float], Run]] = {
    "one-r-p2": lambda p, r, t: run_opennebula(p, r, "recreate", 2, t),
    "one-m-p5": lambda p, r, t: run_opennebula(p, r, "migrate", 5, t),
    "oneha": run_oneha,
}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="profile production/20 instead of production")
    parser.add_argument("--only", type=int, choices=[1, 4], help="only the scenario with this many failed hosts")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args()
    profile = profile_named("production/20" if args.quick else "production")
    timeout_s = 3600 * profile_factor(profile) + 60
    scenarios = [n for n in (1, 4) if args.only in (None, n)]
    names = [c for c in args.contenders.split(",") if c]
    started = time.monotonic()
    jobs = [(n, c) for n in scenarios for c in names]
    results: dict[tuple[int, str], Run | BaseException] = {}

    def one(job: tuple[int, str]) -> None:
        n, c = job
        try:
            results[job] = CONTENDERS[c](profile, Run(c, list(range(n))), timeout_s)
        except BaseException as exc:  # reported in the table; the other runs go on
            results[job] = exc

    threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\nprofile {profile.name}; {HOSTS} hosts x {PER_HOST} VMs; seconds after the power cut")
    header = f"{'scenario':<10}{'contender':<10}" + "".join(f"{m:>9}" for m in MILESTONES) + "  dup lost  notes"
    print(header)
    print("-" * len(header))
    for n, c in jobs:
        r = results[(n, c)]
        name = f"{n}x{PER_HOST}"
        if isinstance(r, BaseException):
            print(f"{name:<10}{c:<10}failed: {r!r}")
            continue
        cells = "".join(f"{fmt(r.marks.get(m)):>9}" for m in MILESTONES)
        print(f"{name:<10}{c:<10}{cells}  {r.duplicates:>3} {r.lost:>4}  {r.note}")
    print(f"\nbench took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
