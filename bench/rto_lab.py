"""What every bench_rto contender shares: the run record, the lab, the power cut and the lab's own milestones."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oneha.lab.sim import LabCloud
from oneha.lab.timeline import Profile
from oneha.settings import ClusterPolicy, SubscriberSettings
from oneha.waiting import wait_until

if TYPE_CHECKING:
    from oneha.lab.hostside import HostSideOptions

HOSTS = 12
PER_HOST = 50


@dataclass
class Run:
    contender: str
    failed: list[int]
    mode: str = "power"  # power: host_kill (oned's view of any power cut); psu / power_loss: lab/hostside.py modes
    vms: list[int] = field(default_factory=list)
    cut: float = 0.0  # wall time of the power cut
    marks: dict[str, float | None] = field(default_factory=dict)  # milestone -> seconds after the cut
    duplicates: int = 0
    lost: int = 0
    note: str = ""


def make_lab(profile: Profile, host_side: HostSideOptions | None = None) -> LabCloud:
    lab = LabCloud(hosts=HOSTS, vms=HOSTS * PER_HOST, capacity=PER_HOST * 4, profile=profile, tick_s=0.02,
                   host_side=host_side)
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
        if run.mode == "power":
            for h in run.failed:
                lab.cloud.host_kill(h)
            return
    assert lab.host_side is not None, f"mode {run.mode} needs the lab's host side"
    for h in run.failed:  # outside the cloud's lock: the host side takes its own lock first, then the cloud's
        lab.host_side.fail(h, run.mode)


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
        for t, kind, oid, name in cloud.timeline:  # a deploy that bypassed the plan (oneha's own placement)
            if t >= first.get(("vm", oid, "PENDING"), float("inf")) and kind == "vm" and \
                    name.startswith(("ACTIVE/PROLOG", "ACTIVE/BOOT")):
                placed[oid] = min(placed.get(oid, t), t)
        oracle = cloud.oracle()

    def latest(times: list[float | None]) -> float | None:
        return None if not times or any(t is None for t in times) else max(t for t in times if t) - run.cut

    run.marks["ERROR"] = latest([first.get(("host", h, "ERROR")) for h in run.failed])
    run.marks["PENDING"] = latest([first.get(("vm", v, "PENDING")) for v in run.vms])
    run.marks["placed"] = latest([placed.get(v) for v in run.vms])
    run.marks["RUNNING"] = latest([last_running.get(v) for v in run.vms])
    run.duplicates = len(oracle["duplicates"])
    run.lost = len(set(oracle["lost"]) & set(run.vms))


def profile_factor(profile: Profile) -> float:
    return profile.manager_timer_s / 15.0


def write_oneha_config(directory: Path, redis_url: str, lab: LabCloud, factor: float, fence: list[str],
                       extra: str = "") -> Path:
    """oneha's configuration for a contender: its defaults (grace, reconcile scaled with the lab's profile),
    `recreate`, the given fence command, and `extra` TOML appended."""
    auth = directory / "one_auth"
    auth.write_text(lab.session + "\n")
    auth.chmod(0o600)
    grace = ClusterPolicy().host_grace_s * factor
    reconcile = SubscriberSettings().reconcile_interval_s * factor
    path = directory / "oneha.toml"
    fencing = ", ".join(f'"{part}"' for part in fence)
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
fencing = [{fencing}]
{extra}""")
    return path


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every contender process group, then SIGKILL what has not ended within 15 s."""
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
