"""oneha against the parts of oned's behaviour the lab used to hide (issue 9): short pool bodies without HA,
POWEROFF instead of UNKNOWN for a vanished domain, accepted calls that change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from oneha.incidents import Kind
from oneha.opennebula import LcmState, VmEvent, VmState, VmView
from oneha.subscriber.intake import failure_kind
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import incidents, running, settings
from tests.test_subscriber_lab import services, toggle_until_heard
from tests.workerkit import vm_timeline, worker_stack

LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}


def test_reconciler_honours_ha_no_although_pool_bodies_are_short(redis_url: str) -> None:
    """The full pass reads the VM pool (short bodies: no USER_TEMPLATE/HA); an opted-out failing VM opens nothing."""
    with running_lab(hosts=2) as lab:
        url = lab.rpc_url
        opted = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING", "HA": "NO"})
        plain = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(url, "lab.faults", {"event_drop_rate": 1.0})
        for vid in (opted, plain):
            call(url, "lab.vm.fail", vid, "BOOT_FAILURE")
        s = settings(redis_url, [lab.events_url], rpc_url=url, session=lab.session)
        with services(1, s) as (svc,):
            wait_until(lambda: svc.reconciler.passes >= 2, 10, what="two reconcile passes")
            found = {(i.kind, i.resource_id) for i in incidents(redis_url)}
        assert (Kind.VM_FAILURE, plain) in found
        assert (Kind.VM_FAILURE, opted) not in found


def view(state: VmState, action: int, lcm: LcmState = LcmState.LCM_INIT) -> VmEvent:
    vm = VmView(7, "vm", state, lcm, 1, "h", 0, history_seq=2, history_action=action)
    return VmEvent(7, state, lcm, vm)


def test_only_a_poweroff_nobody_asked_for_is_a_crash() -> None:
    assert failure_kind(view(VmState.POWEROFF, 44)) is Kind.VM_CRASH  # MONITOR_ACTION
    for action in (19, 20, 11, 0):  # poweroff, poweroff-hard, resume, none
        assert failure_kind(view(VmState.POWEROFF, action)) is None
    assert failure_kind(VmEvent(7, VmState.POWEROFF, LcmState.LCM_INIT, None)) is None  # no body: cannot tell


@pytest.mark.slow
def test_power_blip_shorter_than_grace_and_vanished_domains_are_resumed(tmp_path: Path, redis_url: str) -> None:
    """Issue 11 defect 5 + issue 9 point 2: a host off and on again within host_grace_s, and a domain gone from a
    healthy host, leave VMs POWEROFF with history ACTION = MONITOR; oneha resumes them (an operator's poweroff and
    an HA = NO VM stay off), the oracle ends with nothing lost but the opted-out VM, none twice."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        on_host = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(4)]
        operator_off = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"})
        opted_out = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING", "HA": "NO"})
        crashed = call(url, "lab.vm.create", {"HOST": 2, "STATE": "RUNNING"})
        call(url, "one.vm.action", "poweroff", operator_off)
        s = settings(redis_url, [lab.events_url], rpc_url=url, session=lab.session, host_grace_s=60.0,
                     vm_crash_grace_s=0.0)
        with worker_stack(tmp_path, redis_url, url) as stack, running(s) as svc:
            toggle_until_heard(url, [svc], 0)
            call(url, "lab.host.kill", 1)
            wait_until(lambda: any(i.kind == Kind.HOST for i in incidents(redis_url)), 10, what="host incident")
            call(url, "lab.host.revive", 1)  # back within the grace: the host incident is cancelled
            call(url, "lab.vm.crash", crashed)

            def settled() -> dict | None:
                o = call(url, "lab.oracle")
                return o if o["lost"] == [opted_out] else None

            o = wait_until(settled, 30, what="every VM nobody powered off running again")
            assert o["duplicates"] == []
            for vid in [*on_host, crashed]:
                assert vm_timeline(o, vid).count("ACTIVE/BOOT_POWEROFF") == 1, vm_timeline(o, vid)
            assert vm_timeline(o, operator_off)[-1] == "POWEROFF"
            assert vm_timeline(o, opted_out)[-1] == "POWEROFF"
            host_incidents = [i for i in incidents(redis_url) if i.kind == Kind.HOST]
            assert [i.status.value for i in host_incidents] == ["cancelled"]
            assert stack.store is not None


@pytest.mark.slow
def test_an_accepted_call_that_changed_nothing_is_decided_again_at_once(tmp_path: Path, redis_url: str) -> None:
    """oned answers success and its LCM only logs a state it does not handle (issue 9 point 3; the lab makes that
    race deterministic with `lcm_ignore`). oneha sees the VM unchanged on the first read `accepted_noop_s` after
    the call and acts again, instead of waiting out confirm_timeout_s (30 s here)."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(4)]
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"},
                          worker={"confirm_timeout_s": 30.0, "accepted_noop_s": 0.5}) as stack:
            call(url, "lab.host.kill", 1)
            wait_until(lambda: "<STATE>3<" in call(url, "one.host.info", 1), 10, what="host 1 ERROR")
            call(url, "lab.faults", {"lcm_ignore": 2})
            call(url, "lab.stats", True)
            inc = stack.report_host(1)
            closed = stack.wait_closed(inc, timeout_s=15)
            assert closed.status.value == "recovered", closed.detail
            stats = call(url, "lab.stats")
            assert stats["lcm_ignored"] == 2 and stats["calls"]["one.vm.recover"] == 4 + 2
            o = call(url, "lab.oracle")
            assert all(vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
            retried = [r for r in stack.store.vm_records(inc).values() if r["attempts"] == 2]
            assert len(retried) == 2 and all("changed nothing" in r["detail"] for r in retried)


@pytest.mark.slow
def test_poweroff_resumes_are_loop_protected(tmp_path: Path, redis_url: str) -> None:
    """A VM that keeps going POWEROFF without anyone asking is resumed vm_failure_max_recoveries times per window,
    then left off with an alert."""
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        vid = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        with worker_stack(tmp_path, redis_url, url, worker={"vm_failure_max_recoveries": 1}) as stack:
            statuses = []
            for _ in range(2):
                wait_until(lambda: "<LCM_STATE>3<" in call(url, "one.vm.info", vid), 10, what="RUNNING")
                call(url, "lab.vm.crash", vid)
                wait_until(lambda: "<STATE>8<" in call(url, "one.vm.info", vid), 10, what="POWEROFF")
                seq = call(url, "one.vm.info", vid).rsplit("<SEQ>", 1)[1].split("<")[0]
                inc = stack.report_vm(Kind.VM_CRASH, vid, token=seq)
                closed = stack.wait_closed(inc)
                statuses.append((closed.status.value, closed.detail))
            assert statuses[0][0] == "recovered"
            assert statuses[1][0] == "failed" and "loop protection" in statuses[1][1]
            assert any(e["event"] == "alert" for e in stack.store.log(inc))
            assert "<STATE>8<" in call(url, "one.vm.info", vid)


def test_reconciler_finds_a_poweroff_nobody_asked_for_when_events_are_lost(redis_url: str) -> None:
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        crashed = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        asked = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(url, "lab.faults", {"event_drop_rate": 1.0})
        call(url, "lab.vm.crash", crashed)
        call(url, "one.vm.action", "poweroff", asked)
        wait_until(lambda: all("<STATE>8<" in call(url, "one.vm.info", v) for v in (crashed, asked)), 10,
                   what="both POWEROFF")
        s = settings(redis_url, [lab.events_url], rpc_url=url, session=lab.session, vm_crash_grace_s=60.0)
        with services(1, s) as (svc,):
            wait_until(lambda: svc.reconciler.passes >= 1, 10, what="a full pass")
            found = {(i.kind, i.resource_id) for i in incidents(redis_url)}
        assert found == {(Kind.VM_CRASH, crashed)}


@pytest.mark.slow
def test_reordered_frames_change_nothing(tmp_path: Path, redis_url: str) -> None:
    """oned's hook driver may deliver changes of different objects out of order (15 threads): with every change
    held back behind the next one, a dead host is still recovered once, nothing lost, none twice."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(6)]
        s = settings(redis_url, [lab.events_url], rpc_url=url, session=lab.session, host_grace_s=0.5,
                     vm_crash_grace_s=0.0)
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as stack, \
                running(s) as svc:
            toggle_until_heard(url, [svc], 0)
            call(url, "lab.faults", {"event_reorder_rate": 1.0})
            call(url, "lab.host.kill", 1)

            def settled() -> dict | None:
                o = call(url, "lab.oracle")
                return o if all(o["running"].get(str(v)) for v in vms) and not o["lost"] else None

            o = wait_until(settled, 30, what="all VMs running again")
            assert o["duplicates"] == []
            assert all(vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
            assert call(url, "lab.stats")["events_reordered"] > 0
            host_incidents = [i for i in incidents(redis_url) if i.kind == Kind.HOST]
            assert len(host_incidents) == 1 and stack.store is not None
