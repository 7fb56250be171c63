"""A hung oned mid-recovery: a mutating call whose outcome is unknown is never sent again blindly, and the pool-wide
cap bounds what oned sees (a call oned has not answered keeps its slot). Lab cloud with `lab.faults` hang, real
Redis, `oneha worker` subprocesses, real pyone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from oneha.incidents import Kind
from oneha.keys import Keys
from oneha.opennebula import ErrorKind, RecoverOp
from oneha.settings import OnedSettings
from oneha.waiting import wait_until
from oneha.workers.oned import OnedError, OnedGateway
from tests.labkit import call, running_lab
from tests.workerkit import vm_timeline, worker_stack

LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}
CAP = 4


@pytest.mark.slow
def test_oned_hung_mid_recovery_recovers_each_vm_once_within_the_cap(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=4, **LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(12)]
        call(url, "lab.host.kill", 1)
        wait_until(lambda: "<STATE>3</STATE>" in call(url, "one.host.info", 1), 10, what="host 1 in ERROR")
        oned = {"read_timeout_s": 0.4, "call_attempts": 6, "max_concurrent_calls": CAP, "abandon_after_s": 30.0}
        with worker_stack(tmp_path, redis_url, url, workers=2, concurrency=8, oned=oned,
                          policy={"host_action": "recreate"}) as stack:
            call(url, "lab.faults", {"latency_ms": 150})  # slow enough that the hang finds recover calls
            incident = stack.report_host(1)
            wait_until(lambda: call(url, "lab.stats")["calls"].get("one.vm.recover", 0) >= 1, 30,
                       what="the first recover call")
            call(url, "lab.faults", {"hang": True})
            call(url, "lab.stats", True)  # reset: max_concurrent from now on
            try:
                # The outage: oned answers nothing for ten read timeouts (a fault's duration, not a
                # synchronisation): time enough for the old code to time out and re-send every call.
                time.sleep(4.0)
                during = call(url, "lab.stats")
            finally:
                call(url, "lab.faults", {"hang": False, "latency_ms": 0})
            closed = stack.wait_closed(incident, timeout_s=90)
            after = call(url, "lab.stats")
            o = call(url, "lab.oracle")
    assert during["calls"].get("one.vm.recover", 0) >= 1, during  # the hang did catch recover calls
    assert closed.status.value == "recovered", closed.detail
    # every VM recreated exactly once: each recover reached oned once, none was re-sent after a timeout
    assert {v: vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") for v in vms} == {v: 1 for v in vms}
    assert o["duplicates"] == [] and o["lost"] == []
    # what oned saw in flight at once never exceeded the pool-wide cap
    assert during["max_concurrent"] <= CAP, during
    assert after["max_concurrent"] <= CAP, after


def test_a_timed_out_change_is_not_resent_and_keeps_its_slot_until_oned_answers(redis_client: redis.Redis) -> None:
    """The gateway alone (real lab, Redis, pyone): a recover oned does not answer is UNKNOWN, sent once, its slot
    held until the late answer; another change of that VM meanwhile is refused unsent; reads are retried."""
    with running_lab(hosts=2, vms=2) as lab:
        settings = OnedSettings(endpoint=lab.rpc_url, read_timeout_s=0.3, connect_timeout_s=0.3,
                                abandon_after_s=20.0, call_attempts=3, backoff_base_s=0.01)
        gw = OnedGateway.connect(settings, lab.session, redis_client, Keys())
        call(lab.rpc_url, "lab.faults", {"hang": True})
        try:
            with pytest.raises(OnedError) as err:
                gw.vm_recover(0, RecoverOp.DELETE_RECREATE)
            assert err.value.kind is ErrorKind.UNKNOWN and err.value.attempts == 1
            assert gw.semaphore.holders() == 1 and gw.lingering() == 1  # oned still has it: the slot stays taken
            with pytest.raises(OnedError) as again:
                gw.vm_action("resume", 0)
            assert again.value.kind is ErrorKind.UNKNOWN and "unanswered" in str(again.value)
            assert not gw.settle(0, timeout_s=0.2)
            with pytest.raises(OnedError) as read:
                gw.host_info(0)
            assert read.value.kind is ErrorKind.TRANSIENT and read.value.attempts == 3  # reads are retried
            stats = call(lab.rpc_url, "lab.stats")
            assert stats["calls"]["one.vm.recover"] == 1 and "one.vm.action" not in stats["calls"]
            assert gw.semaphore.holders() == 4 and stats["in_flight"] == 4  # our count is what oned holds
        finally:
            call(lab.rpc_url, "lab.faults", {"hang": False})
        assert gw.settle(0, timeout_s=10)
        wait_until(lambda: gw.lingering() == 0, 10, what="late answers to free the slots")
        gw.semaphore.flush()
        wait_until(lambda: gw.semaphore.holders() == 0, 5, what="slots handed back")
        gw.vm_recover(1, RecoverOp.DELETE_RECREATE)  # another VM: unaffected
        assert call(lab.rpc_url, "lab.stats")["calls"]["one.vm.recover"] == 2


@pytest.mark.slow
def test_oned_hung_mid_resume_resumes_each_crashed_vm_once(tmp_path: Path, redis_url: str) -> None:
    """The VM crash flow takes the same road: a resume without an answer is waited for, not sent again."""
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(12)]
        for vid in vms:
            call(url, "lab.vm.crash", vid, "crashed")  # libvirt crash: UNKNOWN (missing: POWEROFF)
        oned = {"read_timeout_s": 0.4, "call_attempts": 6, "max_concurrent_calls": CAP, "abandon_after_s": 30.0}
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=8, oned=oned) as stack:
            call(url, "lab.faults", {"latency_ms": 150})
            incidents = [stack.report_vm(Kind.VM_CRASH, vid) for vid in vms]
            wait_until(lambda: call(url, "lab.stats")["calls"].get("one.vm.action", 0) >= 1, 30,
                       what="the first resume call")
            call(url, "lab.faults", {"hang": True})
            try:
                time.sleep(3.0)  # the outage: a fault's duration, not a synchronisation
                during = call(url, "lab.stats")
            finally:
                call(url, "lab.faults", {"hang": False, "latency_ms": 0})
            closed = [stack.wait_closed(i, timeout_s=60) for i in incidents]
            stats = call(url, "lab.stats")
            o = call(url, "lab.oracle")
    assert [c.status.value for c in closed] == ["recovered"] * len(vms), [c.detail for c in closed]
    assert stats["calls"]["one.vm.action"] == len(vms)  # one resume per VM reached oned, none re-sent
    assert {v: vm_timeline(o, v).count("ACTIVE/BOOT_UNKNOWN") for v in vms} == {v: 1 for v in vms}
    assert during["max_concurrent"] <= CAP, during


@pytest.mark.slow
def test_a_change_oned_never_answers_is_not_sent_again_after_the_connection_is_closed(tmp_path: Path,
                                                                                      redis_url: str) -> None:
    """oned keeps a `recover` past `abandon_after_s` while it answers everything else: oneha closes the connection,
    but oned runs a call to its end and may apply it at any time. A re-read then shows the VM unchanged, and deciding
    again would send a second recover that lands after the first. The VM is left with an alert instead (PARTIAL);
    when oned gets to the first call, the VM is recreated once."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vm = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"})
        call(url, "lab.host.kill", 1)
        wait_until(lambda: "<STATE>3</STATE>" in call(url, "one.host.info", 1), 10, what="host 1 in ERROR")
        oned = {"read_timeout_s": 0.3, "connect_timeout_s": 0.3, "abandon_after_s": 1.5, "call_attempts": 3}
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=4, oned=oned,
                          policy={"host_action": "recreate"}) as stack:
            call(url, "lab.faults", {"hang_methods": ["one.vm.recover"]})
            try:
                closed = stack.wait_closed(stack.report_host(1), timeout_s=60)
                sent = call(url, "lab.stats")["calls"].get("one.vm.recover", 0)
                record = stack.store.vm_records(closed.id)[vm]
                alerts = [e for e in stack.store.log(closed.id) if e.get("event") == "alert"]
            finally:
                call(url, "lab.faults", {"hang_methods": []})
            wait_until(lambda: "ACTIVE/RUNNING" in vm_timeline(call(url, "lab.oracle"), vm), 30,
                       what="the late recover applied and the VM running again")
            o = call(url, "lab.oracle")
    assert sent == 1, f"recover sent {sent} times"
    assert closed.status.value == "partial" and record["result"] == "failed", (closed.detail, record)
    assert "not sent again" in record["detail"] and alerts, (record, alerts)
    assert vm_timeline(o, vm).count("ACTIVE/CLEANUP_RESUBMIT") == 1 and o["duplicates"] == [] and o["lost"] == []
