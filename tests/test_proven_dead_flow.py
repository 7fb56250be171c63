"""A host proven dead by a detector while oned still shows it MONITORED (issue 13, contract points 4-5).

The lab, a real Redis, `oneha worker` subprocesses and the subscriber's dispatcher; the incident is opened the way a
detector opens it (`proof`, `fenced_at` set). Judged by the lab's oracle (no duplicate, none lost) and by the lab's
call log (`lab.calls`): the host is set OFFLINE and read back OFFLINE before any VM of it is recovered. On the
previous worker code (no `take_host_offline`) all four tests fail: recover 4 ran while the host was MONITORED, the
incident closed `recovered` as soon as the VMs were CLEANUP_RESUBMIT, and the scheduler then put them back onto the
dead host (the emptiest), where they ended in PROLOG_FAILURE: lost, by the oracle.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from oneha.incidents import IncidentStore, Kind
from oneha.opennebula import HostEvent, HostState, OnedClient, make_server
from oneha.settings import Policy
from oneha.subscriber.intake import Intake, Outcome
from oneha.subscriber.reconciler import PassStats, Reconciler
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.workerkit import run_dispatcher, vm_timeline, worker_stack

pytestmark = pytest.mark.slow
# oned's monitoring would notice the dead host only after a minute: within the test it stays MONITORED.
LAB = {"monitoring_interval_s": 60.0, "step_delay_s": 0.05}
VM_CALLS = ("one.vm.recover", "one.vm.action", "one.vm.deploy", "one.vm.migrate")


def open_proven(store: IncidentStore, hid: int, cluster: int = 0) -> int:
    """What `IncidentStore.report_proven_dead` does (the detector's piece): open, mark proven and fenced, due now.
    Opened with a long grace first so no worker sees it before its proof is written."""
    inc = store.report(Kind.HOST, hid, cluster, 600.0, "detector:test").incident_id
    now = round(time.time(), 3)
    store.set_fields(inc, proof="bmc", proven_dead_at=now, fenced_at=now, fence="detector:bmc")
    store.schedule(inc, time.time())
    return inc


def populate(url: str, dead: int, n_dead: int, others: dict[int, int]) -> list[int]:
    """n_dead VMs on the dead host; the other hosts fuller, so the dead host is the emptiest once cleaned up (the
    lab's placement is least-loaded, like the measured oned that "recreated the VM back onto the same dead host")."""
    for host, n in others.items():
        for _ in range(n):
            call(url, "lab.vm.create", {"HOST": host, "STATE": "RUNNING"})
    return [call(url, "lab.vm.create", {"HOST": dead, "STATE": "RUNNING"}) for _ in range(n_dead)]


def vm_of(logged: list[Any]) -> int:
    """The VM a logged VM call acted on (`one.vm.action` takes the action name first)."""
    return int(logged[3][1] if logged[2] == "one.vm.action" else logged[3][0])


def host_state(url: str, hid: int) -> int:
    return int(call(url, "one.host.info", hid).split("<STATE>")[1].split("<")[0])


def offline_before_vm_calls(calls: list[list[Any]], hid: int) -> tuple[int, int, int]:
    """(index of the answered host.status OFFLINE, of the first read showing it OFFLINE, of the first VM call)."""
    status = next(i for i, c in enumerate(calls) if c[2] == "one.host.status" and c[3] == [hid, 2] and c[4])
    read = next(i for i, c in enumerate(calls) if i > status and c[2] == "one.host.info" and c[3][:1] == [hid]
                and c[5] == int(HostState.OFFLINE))
    first_vm = next((i for i, c in enumerate(calls) if c[2] in VM_CALLS), len(calls))
    return status, read, first_vm


def wait_running(url: str, vms: list[int]) -> dict[str, Any]:
    """The oracle once every VM runs somewhere (the incident closes when they have left the host: on their way)."""
    def all_running() -> dict[str, Any] | None:
        o = call(url, "lab.oracle")
        return o if all(o["running"].get(str(v)) for v in vms) else None

    o = wait_until(all_running, 20, what="every VM of the dead host running again")
    assert o["duplicates"] == [] and o["lost"] == []
    return o


def assert_recovered_once(url: str, vms: list[int], dead: int) -> dict[str, Any]:
    o = wait_running(url, vms)
    assert all(o["running"][str(v)] != [dead] and len(o["running"][str(v)]) == 1 for v in vms)
    assert all(vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)  # recovered once each
    assert all("ACTIVE/PROLOG_FAILURE" not in vm_timeline(o, v) for v in vms)
    return o


def test_proven_dead_host_goes_offline_before_any_vm_is_recovered(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 0, 3, {1: 5, 2: 5})
        call(url, "lab.host.kill", 0)  # powered off; oned has not noticed
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as stack:
            assert host_state(url, 0) == HostState.MONITORED
            call(url, "lab.calls", True)  # from here on
            inc = open_proven(stack.store, 0)
            closed = stack.wait_closed(inc)
            assert closed.status.value == "recovered", (closed.detail, stack.store.log(inc)[-8:])
            assert_recovered_once(url, vms, 0)
            calls = call(url, "lab.calls")
            status, read, first_vm = offline_before_vm_calls(calls, 0)
            assert status < read < first_vm < len(calls), calls[:12]
            assert {vm_of(c) for c in calls if c[2] == "one.vm.recover"} == set(vms)
            assert host_state(url, 0) == HostState.OFFLINE  # left OFFLINE for the operator (docs/operations.md)
            log = [e["event"] for e in stack.store.log(inc)]
            assert "fence" not in log  # the detector fenced it
            steps = [e.get("step") for e in stack.store.log(inc) if e["event"] == "step"]
            assert steps.index("take_host_offline") < steps.index("dispatch_vm_recoveries")


def test_proven_dead_host_with_migrate_policy_migrates_from_unknown(tmp_path: Path, redis_url: str) -> None:
    """migrate (resched) from RUNNING would save the VM on the dead host: OFFLINE, then DISABLED (monitord probes at
    once, fails, the VMs go UNKNOWN), then migrate from UNKNOWN; OFFLINE again at the close. On a local (ssh)
    system datastore the RUNNING VMs take migrate_fallback at once."""
    with running_lab(hosts=6, clusters=2, **LAB) as lab:  # cluster 0 (hosts 0, 2, 4) shared, cluster 1 local
        url = lab.rpc_url
        shared = populate(url, 2, 3, {0: 2, 4: 2})
        local = populate(url, 3, 2, {1: 2, 5: 2})
        call(url, "lab.host.fence", 2)
        call(url, "lab.host.fence", 3)
        with worker_stack(tmp_path, redis_url, url,
                          policy={"host_action": "migrate", "migrate_fallback": "recreate"}) as stack:
            call(url, "lab.calls", True)
            inc = open_proven(stack.store, 2)
            inc_local = open_proven(stack.store, 3, cluster=1)
            assert stack.wait_closed(inc).status.value == "recovered"
            assert stack.wait_closed(inc_local).status.value == "recovered"
            o = wait_running(url, shared)
            for v in shared:
                states = vm_timeline(o, v)
                assert "ACTIVE/CLEANUP_RESUBMIT" not in states and states.count("ACTIVE/PROLOG_MIGRATE_UNKNOWN") == 1
                assert o["running"][str(v)] in ([0], [4])
            assert_recovered_once(url, local, 3)
            records = stack.store.vm_records(inc)
            assert {r["action"] for r in records.values()} == {"migrate"}, records
            assert {r["action"] for r in stack.store.vm_records(inc_local).values()} == {"recreate"}
            calls = call(url, "lab.calls")
            status, read, _ = offline_before_vm_calls(calls, 2)
            disabled = next(i for i, c in enumerate(calls) if c[2] == "one.host.status" and c[3] == [2, 1])
            first_vm_of_2 = next(i for i, c in enumerate(calls) if c[2] in VM_CALLS and vm_of(c) in shared)
            assert status < read < disabled < first_vm_of_2
            wait_until(lambda: host_state(url, 2) == HostState.OFFLINE, 5, what="host 2 OFFLINE again")
            assert host_state(url, 3) == HostState.OFFLINE  # never DISABLED: nothing on it could migrate


def test_offline_not_confirmed_touches_no_vm_then_retries(tmp_path: Path, redis_url: str) -> None:
    """oned answers host.status SUCCESS without writing it (`HostAPI::status` ignores `hpool->update`'s result): the
    read-back catches it; held with an alert, no VM touched; once oned applies it, the flow goes on."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 2, 2, {0: 3, 1: 3})
        call(url, "lab.host.kill", 2)
        call(url, "lab.faults", {"host_status_ignore": 1000})
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as stack:
            call(url, "lab.calls", True)
            inc = open_proven(stack.store, 2)
            held = stack.wait_status(inc, "held", timeout_s=30)
            assert "OFFLINE" in held.detail
            assert any(e["event"] == "alert" and "no VM touched" in e.get("message", "")
                       for e in stack.store.log(inc))
            wait_until(lambda: sum(1 for c in call(url, "lab.calls") if c[2] == "one.host.status") >= 2, 20,
                       what="a second attempt")  # tried again, still no VM call
            assert not [c for c in call(url, "lab.calls") if c[2] in VM_CALLS]
            o = call(url, "lab.oracle")
            assert all("ACTIVE/CLEANUP_RESUBMIT" not in vm_timeline(o, v) for v in vms)
            assert host_state(url, 2) == HostState.MONITORED
            call(url, "lab.faults", {"host_status_ignore": 0})
            assert stack.wait_closed(inc, timeout_s=30).status.value == "recovered"
            assert_recovered_once(url, vms, 2)
            status, read, first_vm = offline_before_vm_calls(call(url, "lab.calls"), 2)
            assert status < read < first_vm


def test_oned_error_and_reconciler_join_the_proven_incident(tmp_path: Path, redis_url: str) -> None:
    """oned's ERROR (if it was published before OFFLINE) and the reconciler find the detector's incident: one
    incident, no second recovery. A reconciler pass that sees the host still MONITORED does not cancel it."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = populate(url, 0, 3, {1: 4, 2: 4})
        call(url, "lab.host.kill", 0)
        oned = OnedClient(make_server(url, lab.session, 1.0, 3.0))
        with worker_stack(tmp_path, redis_url, url, dispatcher=False, policy={"host_action": "recreate"}) as stack:
            store = stack.store
            intake = Intake(store, Policy())  # events believed as they come (no re-read): the worst case
            reconciler = Reconciler(lambda: oned, intake, store, 60.0, 600.0, threading.Event())
            inc = open_proven(store, 0)
            reconciler.fast_pass(PassStats("fast"))  # oned: MONITORED, a healthy host... with a proven incident
            assert store.get(inc) is not None and store.get(inc).status.value == "waiting"  # type: ignore[union-attr]
            joined = intake.handle(HostEvent(0, HostState.ERROR, None), "zmq")
            assert joined.incident_id == inc and joined.outcome is not Outcome.OPENED
            stop = threading.Event()
            run_dispatcher(store, stack.celery, 4.0, stop)
            try:
                assert stack.wait_closed(inc).status.value == "recovered"
                assert_recovered_once(url, vms, 0)
                late = intake.handle(HostEvent(0, HostState.ERROR, None), "zmq")
                assert late.incident_id == inc and late.outcome is not Outcome.OPENED  # handled: joins, no new one
                reconciler.fast_pass(PassStats("fast"))
                reconciler.full_pass(PassStats("full"))
                assert store.open_incident_id("host", 0) is None
                assert [i for i in store.open_incident_ids("vm", vms) if i is not None] == []
                o = call(url, "lab.oracle")
                assert all(vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
            finally:
                stop.set()
