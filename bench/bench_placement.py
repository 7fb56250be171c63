"""Placement bench (issue 13): 50 VMs of a dead host placed by oneha (`one.vm.deploy`) vs by oned's scheduler.

    .venv/bin/python -m bench.bench_placement [--divisor 20] [--runs 1]

The lab plays OpenNebula's timelines on `production/N` (every duration / N): the VMM cleanup on the dead host, the
scheduler's window, and the plan manager's one action per host per MANAGER_TIMER. 12 hosts x 50 VMs (capacity 200
each), one host loses power; once oned has it in ERROR the host incident is opened at once (grace 0: detection is
not what is measured here) and two real `oneha worker` processes (8 threads each) fence it through the lab and
`recover 4` its VMs; the cluster's `placement` is the only difference between the two runs. Printed from the
incident's opening: every VM PENDING or beyond, every VM placed (ACTIVE on another host), every VM RUNNING (the
lab's truth), who deployed them (the lab's call log), duplicates and lost VMs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from oneha.lab.sim import LabCloud
from oneha.lab.timeline import profile_named
from oneha.opennebula import HostState, VmState
from oneha.redis_server import RedisServer
from oneha.waiting import wait_until
from tests.workerkit import worker_stack  # the tests' worker stack, reused as is (run from the repository root)

HOSTS, PER_HOST, FAILED = 12, 50, 0


def _vms_of(lab: LabCloud, hid: int) -> list[int]:
    with lab.cloud.lock:
        return sorted(lab.cloud.hosts[hid].vm_ids)


def _marks(lab: LabCloud, vms: list[int]) -> tuple[bool, bool, bool]:
    """(all off the host in oned, all ACTIVE elsewhere, all really running elsewhere)."""
    with lab.cloud.lock:
        views = [lab.cloud.vms[v] for v in vms]
        off = all(v.state == VmState.PENDING or v.hid != FAILED for v in views)
        placed = all(v.state == VmState.ACTIVE and v.hid != FAILED for v in views)
        running = all(lab.cloud.running.get(v.id) and FAILED not in lab.cloud.running[v.id] for v in views)
    return off, placed, running


def run(placement: str, divisor: float, workdir: Path, redis_url: str) -> dict[str, Any]:
    lab = LabCloud(hosts=HOSTS, vms=HOSTS * PER_HOST, capacity=PER_HOST * 4,
                   profile=profile_named(f"production/{divisor:g}"), tick_s=0.02).start(port=0, events_port=0)
    try:
        vms = _vms_of(lab, FAILED)
        with worker_stack(workdir, redis_url, lab.rpc_url, workers=2, concurrency=8,
                          policy={"host_action": "recreate", "placement": placement},
                          worker={"confirm_timeout_s": 120.0, "task_lease_s": 30.0, "lock_ttl_s": 10.0}) as stack:
            lab.cloud.host_kill(FAILED)
            wait_until(lambda: lab.cloud.hosts[FAILED].state == HostState.ERROR, 600, what="host ERROR")
            t0 = time.monotonic()
            since = time.time()
            inc = stack.report_host(FAILED)
            marks: dict[str, float] = {}

            def progress() -> bool:
                for name, ok in zip(("off host", "placed", "running"), _marks(lab, vms), strict=True):
                    if ok and name not in marks:
                        marks[name] = time.monotonic() - t0
                return "running" in marks

            wait_until(progress, 600, interval_s=0.02, backoff=1.0, what="every VM running elsewhere")
            stack.wait_closed(inc, timeout_s=120)
            oracle = lab.cloud.oracle()
            calls = [c for c in lab.cloud.calls_since(since) if c["call"] == "deploy" and c["vm"] in vms]
            return {"placement": placement, **marks,
                    "by_oneha": sum(1 for c in calls if c["by"] == "api" and not c["error"]),
                    "by_scheduler": sum(1 for c in calls if c["by"] == "scheduler" and not c["error"]),
                    "oneha_refused": sum(1 for c in calls if c["by"] == "api" and c["error"]),
                    "plan_refused": sum(1 for c in calls if c["by"] == "scheduler" and c["error"]),
                    "duplicates": len(oracle["duplicates"]), "lost": len(oracle["lost"])}
    finally:
        lab.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--divisor", type=float, default=20.0, help="production/N (default 20)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for i in range(args.runs):
        for placement in ("oneha", "scheduler"):
            server = RedisServer.start()  # a fresh store per run
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    rows.append(run(placement, args.divisor, Path(tmp), server.url))
                    print(f"run {i + 1}: {rows[-1]}", flush=True)
            finally:
                server.stop()
    factor = args.divisor
    print(f"\n{PER_HOST} VMs of one dead host, production/{factor:g}; seconds from the incident's opening "
          f"(x{factor:g} = production seconds)")
    print(f"{'placement':<10} {'off host':>9} {'placed':>8} {'running':>8}  deployed by oneha/scheduler  "
          "refused oneha/plan  dup lost")
    for r in rows:
        print(f"{r['placement']:<10} {r['off host']:>9.2f} {r['placed']:>8.2f} {r['running']:>8.2f}  "
              f"{r['by_oneha']:>17}/{r['by_scheduler']:<9} {r['oneha_refused']:>14}/{r['plan_refused']:<4} "
              f"{r['duplicates']:>3} {r['lost']:>4}")


if __name__ == "__main__":
    main()
