"""Recovery bench: oneha's workers vs a host_error.rb-like baseline, side by side on the same lab setup.

    .venv/bin/python -m bench.bench_recovery [--quick] [--timeline]

Environment: ONEHA_BENCH_CAP (the pool-wide oned cap, default 16; the baseline runs up to 15 calls at once, the
hook manager's concurrency), ONEHA_BENCH_WORKER_LOG (keep the workers' log at this path).

Scenarios: 1 failed host x 50 VMs, and 20 failed hosts x 50 VMs, with 20 ms oned latency (lab.faults). The clock
starts when the lab shows every failed host in ERROR ("confirmed failure"; grace 0 for both). Measured:
- oneha: incidents reported -> dispatched -> workers; "confirmed" = every incident closed (each VM's action done
  and the VM seen leaving the host); "recovered" = the lab's truth shows every VM running on another host.
- baseline: "issued" = every action sent (all it does); "recovered" = the lab shows every VM running elsewhere.
Also: oned calls per VM (lab.stats) and the most concurrent oned calls seen by the lab vs oneha's cap.
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
from pathlib import Path
from typing import Any

import redis

from bench.baseline_host_error import run_baseline
from oneha.incidents import IncidentStore, Kind
from oneha.keys import Keys
from oneha.lab.cli import lab_call
from oneha.lab.sim import LabCloud
from oneha.opennebula import HostState
from oneha.redis_server import RedisServer
from oneha.settings import load_settings
from oneha.waiting import wait_until

PER_HOST = 50
LATENCY_MS = 20
CAP = int(os.environ.get("ONEHA_BENCH_CAP", "16"))  # the pool-wide oned cap; the baseline runs up to 15 at once
POLL_S = 0.005  # how often the bench looks at the lab's truth: the same for both, and small against the figures
FENCE = ["true"]  # a fence command that succeeds at once: the bench measures recovery, not a BMC


def make_lab(failed: int) -> LabCloud:
    hosts = failed * 2 + (2 if failed == 1 else 0)
    lab = LabCloud(hosts=hosts, vms=hosts * PER_HOST, monitoring_interval_s=0.5, step_delay_s=0.05,
                   capacity=PER_HOST * 4, tick_s=0.02)
    return lab.start(port=0, events_port=0)


def fail_hosts(lab: LabCloud, hosts: list[int]) -> float:
    for h in hosts:
        lab_call(lab.rpc_url, "lab.host.kill", h)
    wait_until(lambda: all(lab.cloud.hosts[h].state == HostState.ERROR for h in hosts), 20, interval_s=0.01,
               what="hosts in ERROR")
    return time.monotonic()


def vms_of(lab: LabCloud, hosts: list[int]) -> list[int]:
    with lab.cloud.lock:
        return [v for h in hosts for v in sorted(lab.cloud.hosts[h].vm_ids)]


def all_running_elsewhere(lab: LabCloud, vms: list[int], hosts: list[int]) -> bool:
    failed = set(hosts)
    with lab.cloud.lock:
        return all((r := lab.cloud.running.get(v)) and not (r & failed) for v in vms)


def stats(lab: LabCloud, reset: bool = False) -> dict[str, Any]:
    return dict(lab_call(lab.rpc_url, "lab.stats", reset))


def bench_baseline(failed: int) -> dict[str, Any]:
    lab = make_lab(failed)
    try:
        hosts = list(range(failed))
        vms = vms_of(lab, hosts)
        lab_call(lab.rpc_url, "lab.faults", {"latency_ms": LATENCY_MS})
        t0 = fail_hosts(lab, hosts)
        stats(lab, reset=True)
        out = run_baseline(lab.rpc_url, lab.session, hosts, "recreate", 15, FENCE)
        wait_until(lambda: all_running_elsewhere(lab, vms, hosts), 120, interval_s=POLL_S, backoff=1.0,
                   what="baseline: all recovered")
        recovered = time.monotonic() - t0
        st = stats(lab)
        return {"vms": len(vms), "issued_s": out["issue_s"], "recovered_s": recovered,
                "calls_per_vm": st["total_one_calls"] / len(vms), "max_concurrent": st["max_concurrent"]}
    finally:
        lab.stop()


def write_config(directory: Path, redis_url: str, lab: LabCloud) -> Path:
    auth = directory / "one_auth"
    auth.write_text(lab.session + "\n")
    auth.chmod(0o600)
    path = directory / "oneha.toml"
    path.write_text(f"""
[redis]
url = "{redis_url}"
[oned]
endpoint = "{lab.rpc_url}"
auth_file = "{auth}"
max_concurrent_calls = {CAP}
read_timeout_s = 10.0
[worker]
task_lease_s = 30.0
confirm_timeout_s = 60.0
storm_max_share = 1.0
storm_max_hosts = 1000
metrics_port = 0
[policy.default]
host_action = "recreate"
host_grace_s = 0.0
fencing = {FENCE!r}
""".replace("'", '"'))
    return path


def timeline(store: IncidentStore, incident_id: int, t0_wall: float) -> list[str]:
    """The audit log of one incident as seconds after the failure was confirmed, and per-VM record figures."""
    lines = []
    per_vm = ("claim_vm", "recreate_vm", "delete_vm", "migrate_vm", "confirm_vm_left_host")
    for e in store.log(incident_id):
        if e.get("event") == "vm" or e.get("step") in per_vm:
            continue
        what = e.get("step") or e.get("event")
        lines.append(f"  {e['t'] - t0_wall:7.3f}  {what}  {e.get('ms', '')}")
    recs = list(store.vm_records(incident_id).values())
    starts = sorted(r["started_at"] - t0_wall for r in recs if r.get("started_at"))
    acted = [r["acted_at"] - r["started_at"] for r in recs if r.get("acted_at")]
    conf = [r["confirmed_at"] - r["acted_at"] for r in recs if r.get("acted_at") and r.get("confirmed_at")]
    if starts:
        lines.append(f"  VM tasks started {starts[0]:.3f}..{starts[-1]:.3f}; started->acted mean "
                     f"{1000 * sum(acted) / max(1, len(acted)):.0f} ms, acted->confirmed mean "
                     f"{1000 * sum(conf) / max(1, len(conf)):.0f} ms")
    return lines


def bench_oneha(failed: int, workers: int, concurrency: int) -> dict[str, Any]:
    from oneha.subscriber.dispatcher import Dispatcher, make_celery

    lab = make_lab(failed)
    server = RedisServer.start()
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = write_config(Path(tmp), server.url, lab)
            settings = load_settings(cfg)
            client = redis.Redis.from_url(server.url, decode_responses=True)
            keys = Keys()
            store = IncidentStore(client, keys)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("ONEHA_CONFIG", None)
            log = open(os.environ.get("ONEHA_BENCH_WORKER_LOG") or Path(tmp) / "workers.log", "wb")  # noqa: SIM115
            for i in range(workers):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "oneha", "worker", "--config", str(cfg), "--concurrency", str(concurrency),
                     "--loglevel", "WARNING", "--hostname", f"bench{i}@local"], stdout=log, stderr=log, env=env))
            wait_until(lambda: sum(1 for k in client.hkeys(keys.heartbeat) if str(k).startswith("worker:")) >= workers,
                       60,
                       what="workers ready")
            celery = make_celery(settings)
            dispatcher = Dispatcher(store, celery, settings.worker.task_lease_s, 0.02, stop)
            threading.Thread(target=dispatcher.run, daemon=True).start()
            hosts = list(range(failed))
            vms = vms_of(lab, hosts)
            lab_call(lab.rpc_url, "lab.faults", {"latency_ms": LATENCY_MS})
            t0 = fail_hosts(lab, hosts)
            t0_wall = time.time() - (time.monotonic() - t0)
            stats(lab, reset=True)
            incidents = [store.report(Kind.HOST, h, 0, 0.0, "bench").incident_id for h in hosts]
            dispatcher.wake.set()

            def closed() -> bool:
                return all((inc := store.get(i)) is not None and not inc.status.is_open for i in incidents)

            wait_until(lambda: all_running_elsewhere(lab, vms, hosts), 120, interval_s=POLL_S, backoff=1.0,
                       what="all recovered")
            recovered = time.monotonic() - t0
            wait_until(closed, 150, interval_s=POLL_S, backoff=1.0, what="incidents closed")
            # From the incidents' own closing times, not from when this loop happened to look.
            confirmed = max(store.get(i).closed_at or 0.0 for i in incidents) - t0_wall  # type: ignore[union-attr]
            st = stats(lab)
            statuses = sorted({store.get(i).status.value for i in incidents})  # type: ignore[union-attr]
            return {"vms": len(vms), "confirmed_s": confirmed, "recovered_s": recovered, "statuses": statuses,
                    "calls_per_vm": st["total_one_calls"] / len(vms), "max_concurrent": st["max_concurrent"],
                    "calls": st["calls"], "duplicates": len(lab.cloud.oracle()["duplicates"]),
                    "timeline": timeline(store, incidents[0], t0_wall)}
        finally:
            stop.set()
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            lab.stop()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="only the 1-host scenario")
    parser.add_argument("--timeline", action="store_true", help="print the first incident's audit timeline")
    args = parser.parse_args()
    started = time.monotonic()
    rows = []
    for failed in [1] if args.quick else [1, 20]:
        base = bench_baseline(failed)
        ours = bench_oneha(failed, args.workers, args.concurrency)
        rows.append((failed, base, ours))
    print(f"\n{LATENCY_MS} ms oned latency; oneha: {args.workers} worker(s) x {args.concurrency} threads, "
          f"oned cap {CAP}")
    header = (f"{'scenario':<14}{'who':<10}{'issued s':>10}{'confirmed s':>13}{'recovered s':>13}"
              f"{'calls/VM':>10}{'max conc':>10}  notes")
    print(header)
    print("-" * len(header))
    for failed, base, ours in rows:
        name = f"{failed}x{PER_HOST} VMs"
        print(f"{name:<14}{'baseline':<10}{base['issued_s']:>10.2f}{'-':>13}{base['recovered_s']:>13.2f}"
              f"{base['calls_per_vm']:>10.2f}{base['max_concurrent']:>10}  confirms nothing")
        print(f"{'':<14}{'oneha':<10}{'-':>10}{ours['confirmed_s']:>13.2f}{ours['recovered_s']:>13.2f}"
              f"{ours['calls_per_vm']:>10.2f}{ours['max_concurrent']:>10}  cap {CAP}; {ours['statuses']}; "
              f"duplicates {ours['duplicates']}")
        ratio = (base["issued_s"] + 0.0) / ours["confirmed_s"]
        print(f"{'':<14}{'':<10}baseline issue / oneha confirmed = {ratio:.1f}x; baseline recovered / oneha "
              f"recovered = {base['recovered_s'] / ours['recovered_s']:.1f}x")
        print(f"{'':<14}{'':<10}oneha calls: {ours['calls']}")
        if args.timeline:
            print("\n".join(ours["timeline"]))
    print(f"\nbench took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
