"""End to end: the lab cloud, a real Redis, `oneha worker` subprocesses, real pyone, the subscriber's dispatcher.

"None twice, nothing lost" is asserted with the lab's truth oracle; "acted once" with the lab's timeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oneha.incidents import Kind
from oneha.keys import HOST_QUEUE, TASK_RECOVER_HOST, TASK_RECOVER_VM, VM_QUEUE
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.workerkit import timeline_time, vm_timeline, worker_stack

pytestmark = pytest.mark.slow
LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}
CLOSED = ("recovered", "partial", "failed", "no_action", "cancelled")


def populate(url: str, host: int, n: int = 20, **extra: Any) -> list[int]:
    return [call(url, "lab.vm.create", {"HOST": host, "STATE": "RUNNING", "HA_PRIORITY": i % 4, **extra})
            for i in range(n)]


def kill_and_wait_error(url: str, host: int, how: str | None = "lab.host.kill") -> None:
    if how:
        call(url, how, host)
    wait_until(lambda: int(call(url, "one.host.info", host).split("<STATE>")[1].split("<")[0]) == 3, 10,
               what=f"host {host} ERROR")


def oracle(url: str) -> dict[str, Any]:
    return call(url, "lab.oracle")


def assert_recovered_elsewhere(url: str, vms: list[int], failed_host: int) -> dict[str, Any]:
    def all_running() -> dict[str, Any] | None:
        o = oracle(url)
        ok = all(o["running"].get(str(v)) and failed_host not in o["running"][str(v)] for v in vms)
        return o if ok else None

    o = wait_until(all_running, 20, what="all VMs running elsewhere")
    assert o["duplicates"] == []
    assert all(len(o["running"][str(v)]) == 1 for v in vms)
    return o


def acted_count(o: dict[str, Any], vid: int, state: str) -> int:
    return vm_timeline(o, vid).count(state)


def test_host_failure_recreate_priority_opt_out_and_off_vms(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=4, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 1)
        opted_out = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING", "HA": "NO", "HA_PRIORITY": 9})
        suspended = call(url, "lab.vm.create", {"HOST": 1, "STATE": "SUSPENDED"})
        # Priority is the dispatch order on a FIFO queue: with fewer slots than VMs (4 threads, 20 VMs), the
        # low-priority tasks only start once higher ones are done. (With more slots than VMs, all act at once.)
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=4,
                          policy={"host_action": "recreate"}) as stack:
            kill_and_wait_error(url, 1)
            inc = stack.report_host(1)
            closed = stack.wait_closed(inc)
            assert closed.status.value == "recovered", closed.detail
            o = assert_recovered_elsewhere(url, vms, 1)
            assert all(acted_count(o, v, "ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)  # none twice
            assert "ACTIVE/CLEANUP_RESUBMIT" not in vm_timeline(o, opted_out)  # untouched
            assert vm_timeline(o, opted_out)[-1] == "ACTIVE/UNKNOWN"
            assert vm_timeline(o, suspended)[-1] == "SUSPENDED"  # include_suspended = false
            records = stack.store.vm_records(inc)
            assert sorted(records) == sorted(vms)
            assert all(r["result"] == "recovered" and r["action"] == "recreate" for r in records.values())
            # higher HA_PRIORITY first: every priority-3 VM was acted on before any priority-0 VM
            acted = {v: timeline_time(o, v, "ACTIVE/CLEANUP_RESUBMIT") or 0.0 for v in vms}
            prio = {v: i % 4 for i, v in enumerate(vms)}
            assert max(acted[v] for v in vms if prio[v] == 3) <= min(acted[v] for v in vms if prio[v] == 0)
            log = [e["event"] for e in stack.store.log(inc)]
            assert "fence" in log and "closed:recovered" in log


def test_host_failure_migrate_on_shared_datastore_with_off_vms(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=6, clusters=2, **LAB) as lab:  # cluster 0 (hosts 0, 2, 4) shared
        url = lab.rpc_url
        vms = populate(url, 2)
        poweroff = call(url, "lab.vm.create", {"HOST": 2, "STATE": "POWEROFF"})
        suspended = call(url, "lab.vm.create", {"HOST": 2, "STATE": "SUSPENDED"})
        with worker_stack(tmp_path, redis_url, url,
                          policy={"host_action": "migrate", "include_suspended": True}) as stack:
            kill_and_wait_error(url, 2)
            inc = stack.report_host(2)
            closed = stack.wait_closed(inc)
            assert closed.status.value == "recovered", closed.detail
            o = assert_recovered_elsewhere(url, [*vms, suspended], 2)
            assert all(acted_count(o, v, "ACTIVE/PROLOG_MIGRATE_UNKNOWN") == 1 for v in vms)
            records = stack.store.vm_records(inc)
            assert {records[v]["action"] for v in vms} == {"migrate"}
            assert records[suspended]["action"] == "recreate"  # resched is refused from SUSPENDED: fallback
            assert records[poweroff]["action"] == "migrate"
            assert vm_timeline(o, poweroff)[-1] == "POWEROFF"  # moved, still off by intent
            hist = call(url, "one.vm.info", poweroff)
            assert "<HID>2</HID>" in hist and hist.rindex("<HID>") > hist.index("<HID>2</HID>")


def test_host_failure_delete(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 0)
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "delete"}) as stack:
            kill_and_wait_error(url, 0)
            inc = stack.report_host(0)
            assert stack.wait_closed(inc).status.value == "recovered"
            o = oracle(url)
            assert all(vm_timeline(o, v)[-1] == "DONE" for v in vms)
            assert all(acted_count(o, v, "ACTIVE/CLEANUP_DELETE") == 1 for v in vms)


def test_fence_failure_touches_nothing_and_partition_with_fencing_has_no_duplicate(
        tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=4, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 1, n=5)
        with worker_stack(tmp_path, redis_url, url, env={"ONEHA_LAB_FENCE_FAIL": "1"}) as stack:
            kill_and_wait_error(url, 1, "lab.host.partition")
            inc = stack.report_host(1)
            held = stack.wait_status(inc, "fence_failed")
            assert "fencing failed" in held.detail
            o = oracle(url)
            assert all(vm_timeline(o, v)[-1] == "ACTIVE/UNKNOWN" for v in vms)  # nothing touched
            assert all(o["running"][str(v)] == [1] for v in vms)  # still running behind the partition
        with worker_stack(tmp_path, redis_url, url) as stack:  # fencing works now; approve retries it
            stack.store.approve(inc)
            assert stack.wait_closed(inc).status.value == "recovered"
            o = assert_recovered_elsewhere(url, vms, 1)  # fenced before recreating: never twice
            assert o["duplicates"] == []


def test_storm_held_until_approved(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=4, **LAB) as lab:
        url = lab.rpc_url
        a, b = populate(url, 1, n=3), populate(url, 2, n=3)
        with worker_stack(tmp_path, redis_url, url, workers=1) as stack:
            call(url, "lab.host.kill", 1)
            call(url, "lab.host.kill", 2)
            kill_and_wait_error(url, 2, None)
            incs = [stack.report_host(1), stack.report_host(2)]
            for inc in incs:
                assert "2/4 hosts" in stack.wait_status(inc, "held").detail
            o = oracle(url)
            assert all(vm_timeline(o, v)[-1] == "ACTIVE/UNKNOWN" for v in a + b)
            for inc in incs:
                stack.store.approve(inc)
            for inc in incs:
                assert stack.wait_closed(inc).status.value == "recovered"
            assert_recovered_elsewhere(url, a + b, 1)


def test_vm_failure_recreated_once_then_loop_protection_and_crash_resumed(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        once, sticky, crashed = populate(url, 0, n=3)
        with worker_stack(tmp_path, redis_url, url, workers=1,
                          worker={"vm_failure_max_recoveries": 2}) as stack:
            call(url, "lab.vm.fail", once, "BOOT_FAILURE", False)
            inc = stack.report_vm(Kind.VM_FAILURE, once, token="0")
            assert stack.wait_closed(inc).status.value == "recovered"
            wait_until(lambda: oracle(url)["running"].get(str(once)), 10, what="VM running again")
            assert acted_count(oracle(url), once, "ACTIVE/CLEANUP_RESUBMIT") == 1

            call(url, "lab.vm.fail", sticky, "BOOT_FAILURE", True)
            statuses = []
            for _ in range(3):
                def failed_again() -> str | None:
                    text = call(url, "one.vm.info", sticky)
                    lcm = int(text.split("<LCM_STATE>")[1].split("<")[0])
                    seq = text.rsplit("<SEQ>", 1)[1].split("<")[0]
                    return seq if lcm == 36 and stack.store.open_incident_id("vm", sticky) is None else None

                seq = wait_until(failed_again, 10, what="BOOT_FAILURE again")
                inc = stack.report_vm(Kind.VM_FAILURE, sticky, token=seq)
                statuses.append(stack.wait_closed(inc).status.value)
            assert statuses == ["recovered", "recovered", "failed"]  # K = 2, then left alone
            assert acted_count(oracle(url), sticky, "ACTIVE/CLEANUP_RESUBMIT") == 2
            assert any(e["event"] == "alert" for e in stack.store.log(inc))

            call(url, "lab.vm.crash", crashed, "crashed")
            wait_until(lambda: "<LCM_STATE>16<" in call(url, "one.vm.info", crashed), 10, what="UNKNOWN")
            inc = stack.report_vm(Kind.VM_CRASH, crashed, token="0")
            assert stack.wait_closed(inc).status.value == "recovered"
            o = oracle(url)
            assert o["running"][str(crashed)] == [0] and "ACTIVE/BOOT_UNKNOWN" in vm_timeline(o, crashed)


def test_slow_flaky_oned_still_recovers_everything(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 1)
        with worker_stack(tmp_path, redis_url, url, oned={"call_attempts": 8}) as stack:
            kill_and_wait_error(url, 1)
            call(url, "lab.stats", True)
            call(url, "lab.faults", {"error_rate": 0.3, "latency_ms": 30})
            inc = stack.report_host(1)
            closed = stack.wait_closed(inc, timeout_s=90)
            call(url, "lab.faults", {"error_rate": 0.0, "latency_ms": 0})
            assert closed.status.value == "recovered", closed.detail
            o = assert_recovered_elsewhere(url, vms, 1)
            assert all(acted_count(o, v, "ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
            stats = call(url, "lab.stats")
            assert stats["max_concurrent"] <= 8 + 1  # the cap (+1: lab.* calls of the test itself)
            assert stats["calls"]["one.vm.recover"] <= 20 * 8  # retries bounded


def test_worker_killed_mid_flow_and_duplicate_deliveries(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, monitoring_interval_s=0.5, step_delay_s=0.3) as lab:
        url = lab.rpc_url
        vms = populate(url, 1)
        with worker_stack(tmp_path, redis_url, url, workers=2, concurrency=4) as stack:
            kill_and_wait_error(url, 1)
            inc = stack.report_host(1)
            # the same host task delivered twice more, concurrently
            stack.send(TASK_RECOVER_HOST, [inc], HOST_QUEUE)
            stack.send(TASK_RECOVER_HOST, [inc], HOST_QUEUE)
            wait_until(lambda: len(stack.store.vm_records(inc)) >= 2, 30, what="first VMs recovered")
            stack.workers.kill(stack.workers.procs[0])  # SIGKILL mid-flow
            for v in vms[:5]:  # duplicate VM tasks
                stack.send(TASK_RECOVER_VM, [inc, v], VM_QUEUE)
            closed = stack.wait_closed(inc, timeout_s=90)
            assert closed.status.value == "recovered", closed.detail
            o = assert_recovered_elsewhere(url, vms, 1)
            assert all(acted_count(o, v, "ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
            assert sorted(stack.store.vm_records(inc)) == sorted(vms)




def test_vm_tasks_queued_longer_than_the_lease_are_not_sent_again(tmp_path: Path, redis_url: str) -> None:
    """A large failure: host B's VM tasks wait behind host A's for longer than B's lease. The watchdog re-runs B's
    host task, which must see the queue moving and leave B's queued tasks alone instead of sending them again."""
    with running_lab(hosts=4, **LAB) as lab:
        url = lab.rpc_url
        first, second = populate(url, 1, n=40), populate(url, 2, n=10)
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=2,
                          worker={"task_lease_s": 1.0, "lock_ttl_s": 2.0, "storm_max_share": 1.0}) as stack:
            call(url, "lab.faults", {"latency_ms": 50})
            kill_and_wait_error(url, 1)
            kill_and_wait_error(url, 2)
            a = stack.report_host(1)
            stack.wait_status(a, "recovering", *CLOSED)
            b = stack.report_host(2)
            for inc in (a, b):
                closed = stack.wait_closed(inc, timeout_s=90)
                assert closed.status.value == "recovered", closed.detail
            call(url, "lab.faults", {"latency_ms": 0})
            o = assert_recovered_elsewhere(url, first, 1)
            assert_recovered_elsewhere(url, second, 2)
            assert all(acted_count(o, v, "ACTIVE/CLEANUP_RESUBMIT") == 1 for v in first + second)
            rechecks = [e for e in stack.store.log(b) if e.get("event") == "redispatch"]
            assert rechecks, f"B's lease never ran out: the scenario tested nothing {stack.store.log(b)}"
            assert sum(e["vms"] for e in rechecks) == 0, rechecks
            assert any(e["queued"] > 0 for e in rechecks)
