"""RTO bench: from a host's power cut to every one of its VMs running elsewhere, as the user waits for it.

    .venv/bin/python -m bench.bench_rto [--quick] [--only 1psu,4psu] [--contenders oneha,oneha-detect]
                                        [--vmm-threads N]

The lab plays OpenNebula's own timelines (lab/timeline.py, profile `production`: monitord's 180 s interval on a
15 s timer and a failing SSH start_monitor, the VMM cleanup on the dead host, the scheduler's window, its 60 s retry
and the plan manager's one action per host per 15 s). Scenarios, in a cloud of 12 hosts x 50 VMs (capacity 200 each):
`1psu` 1 host with 50 VMs whose power supply fails (its BMC still answers, "Off"), `1loss` the same host losing all
power (BMC dead too), `4psu` 4 hosts (200 VMs) at once. oned sees the three the same way (a silent host), so the
contenders that wait for oned run `1psu` and `4psu` only. Contenders, each on its own lab, all running at the same
time (the figures are waits, not CPU):
- `one-r-p2`: OpenNebula alone: monitord sets ERROR, the `host_error.rb -r -p 2` hook (bench/baseline_host_error.py:
  sleeps 2 x 60 s, re-reads the host, fences — assumed to work —, `recover 4` per VM), oned's scheduler places them.
- `one-m-p5`: the same with `-m -p 5`, the documented registration (`resched` per VM: a cold migration from UNKNOWN).
- `oneha`: oneha as it is today (its defaults: 60 s host grace, 30 s reconcile), real subscriber on the lab's ZeroMQ
  events + two real Celery workers, reacting to oned's ERROR; fencing assumed to work (`true`), action `recreate`.
- `oneha-detect`: oneha with its own detection (issue 13, bench/rto_detect.py): two `oneha detect` instances probing
  every host's management side, proof by the Redfish BMC or the storage heartbeat, oneha's own placement; every host
  runs the agent's model (watchdog). Its column "ERROR" is oned's, which it does not wait for (and, with the host
  taken OFFLINE, never comes); "proven" is when the detector proved the host dead.
`--vmm-threads N` runs every contender with oned's VM_MAD `-t N` instead of 15 (an operator's knob in oned.conf).
Printed per contender: power cut -> ERROR -> fenced -> all actions issued -> all PENDING -> all placed (deploy or
migrate started by the plan manager) -> all RUNNING elsewhere (the lab's truth), duplicates and lost VMs.
`--quick` runs the same on production/20 (every duration / 20; the hook's sleep and oneha's grace/reconcile too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from bench.baseline_host_error import host_error
from bench.rto_lab import (
    HOSTS,
    PER_HOST,
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
from oneha.lab.timeline import Profile, profile_named
from oneha.opennebula import HostState
from oneha.redis_server import RedisServer
from oneha.waiting import wait_until

FENCE = ["true"]  # fencing assumed to work: the bench measures the wait, not a BMC
MILESTONES = ["ERROR", "proven", "fenced", "issued", "PENDING", "placed", "RUNNING"]
SCENARIOS = {"1psu": (1, "psu"), "1loss": (1, "power_loss"), "4psu": (4, "psu")}
WAITS_FOR_ONED = ("one-r-p2", "one-m-p5", "oneha")  # they see every scenario as the same silent host


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


# ------------------------------------------------------------------------------------------------------------
# oneha as it is today: subscriber + workers react to oned's ERROR event

def run_oneha(profile: Profile, run: Run, timeout_s: float) -> Run:
    lab = make_lab(profile)
    server = RedisServer.start()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import redis

            cfg = write_oneha_config(Path(tmp), server.url, lab, profile_factor(profile), FENCE)
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
            stop_processes(procs)
            lab.stop()
            server.stop()


def run_oneha_detect(profile: Profile, run: Run, timeout_s: float) -> Run:
    from bench.rto_detect import run_detect  # sushy-tools (the lab's host side) only when this contender runs

    return run_detect(profile, run, timeout_s)


CONTENDERS: dict[str, Callable[[Profile, Run, float], Run]] = {
    "one-r-p2": lambda p, r, t: run_opennebula(p, r, "recreate", 2, t),
    "one-m-p5": lambda p, r, t: run_opennebula(p, r, "migrate", 5, t),
    "oneha": run_oneha,
    "oneha-detect": run_oneha_detect,
}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="profile production/20 instead of production")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, of {', '.join(SCENARIOS)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--vmm-threads", type=int, default=None, help="oned's VM_MAD -t (default 15)")
    args = parser.parse_args()
    profile = profile_named("production/20" if args.quick else "production")
    if args.vmm_threads:
        profile = replace(profile, vmm_threads=args.vmm_threads, name=f"{profile.name}, VM_MAD -t {args.vmm_threads}")
    timeout_s = 3600 * profile_factor(profile) + 60
    names = [c for c in args.contenders.split(",") if c]
    jobs = [(sc, c) for sc in args.only.split(",") if sc for c in names
            if not (c in WAITS_FOR_ONED and SCENARIOS[sc][1] != "psu")]
    started = time.monotonic()
    results = run_jobs(profile, jobs, timeout_s)
    print_table(profile, jobs, results)
    print(f"\nbench took {time.monotonic() - started:.0f} s")


def run_jobs(profile: Profile, jobs: list[tuple[str, str]], timeout_s: float
             ) -> dict[tuple[str, str], Run | BaseException]:
    results: dict[tuple[str, str], Run | BaseException] = {}

    def one(job: tuple[str, str]) -> None:
        scenario, c = job
        n, mode = SCENARIOS[scenario]
        try:
            results[job] = CONTENDERS[c](profile, Run(c, list(range(n)), mode if c == "oneha-detect" else "power"),
                                         timeout_s)
        except BaseException as exc:  # reported in the table; the other runs go on
            results[job] = exc

    threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def print_table(profile: Profile, jobs: list[tuple[str, str]], results: dict[tuple[str, str], Run | BaseException]
                ) -> None:
    print(f"\nprofile {profile.name}; {HOSTS} hosts x {PER_HOST} VMs; seconds after the power cut")
    header = f"{'scenario':<10}{'contender':<14}" + "".join(f"{m:>9}" for m in MILESTONES) + "  dup lost  notes"
    print(header)
    print("-" * len(header))
    for scenario, c in jobs:
        r = results[(scenario, c)]
        if isinstance(r, BaseException):
            print(f"{scenario:<10}{c:<14}failed: {r!r}")
            continue
        cells = "".join(f"{fmt(r.marks.get(m)):>9}" for m in MILESTONES)
        print(f"{scenario:<10}{c:<14}{cells}  {r.duplicates:>3} {r.lost:>4}  {r.note}")

if __name__ == "__main__":
    main()
