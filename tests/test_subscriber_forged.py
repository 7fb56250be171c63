"""Events are hints: forged host events on a ZeroMQ publisher the subscriber listens to change nothing oned does
not confirm. Lab cloud, a second PUB socket for the forger, the subscriber service in-process (zmq, reconciler,
dispatcher), `oneha worker` subprocesses, real Redis."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from oneha.incidents import IncidentStore, Kind, ReportRequest
from oneha.opennebula import HostEvent, HostState, OnedClient, make_server
from oneha.settings import Policy
from oneha.subscriber.hostcheck import HostCheck
from oneha.subscriber.intake import Intake, Outcome
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import host_message, metric, publisher, running, settings, sync
from tests.workerkit import vm_timeline, worker_stack

LAB = {"monitoring_interval_s": 0.3, "step_delay_s": 0.03}


@pytest.mark.slow
def test_forged_host_back_frames_do_not_keep_a_dead_host_from_recovery(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **LAB) as lab, publisher() as (forger, forged_url):
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(4)]
        s = settings(redis_url, [lab.events_url, forged_url], rpc_url=lab.rpc_url, session=lab.session,
                     host_grace_s=1.0)
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1, dispatcher=False,
                          policy={"host_action": "recreate"}) as stack, \
                running(s, ("zmq", "reconciler", "dispatcher")) as svc:
            sync(forger, svc)
            before = metric("oneha_event_disagreements_total", source="zmq", event="host_healthy")
            stop = threading.Event()

            def forge() -> None:  # "host 1 is back", twice a grace period, for as long as the test runs
                while not stop.wait(0.5):
                    forger.send_multipart(list(host_message(1, "MONITORED", 2)))

            thread = threading.Thread(target=forge, daemon=True)
            thread.start()
            try:
                call(lab.rpc_url, "lab.host.kill", 1)

                def recovered() -> dict[str, object] | None:
                    o = call(lab.rpc_url, "lab.oracle")
                    running_on = o["running"]
                    done = all(str(v) in running_on and 1 not in running_on[str(v)] for v in vms)
                    return o if done else None

                o = wait_until(recovered, 30, what="the dead host's VMs running elsewhere")
            finally:
                stop.set()
                thread.join(5)
            incidents = stack.store.recent(100)
        assert o["duplicates"] == []
        assert all(vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") == 1 for v in vms)
        host_incidents = [i for i in incidents if i.kind is Kind.HOST]
        assert [i.status.value for i in host_incidents] == ["recovered"]  # none cancelled "host back"
        assert metric("oneha_event_disagreements_total", source="zmq", event="host_healthy") > before


def test_a_forged_error_for_a_healthy_host_opens_nothing_so_a_crash_on_it_is_not_owned(
        redis_client: redis.Redis) -> None:
    """A forged ERROR for a healthy host opens no host incident (oned says MONITORED), so a real VM crash on that
    host opens its own incident instead of waiting as "owned by the host incident"."""
    with running_lab(hosts=2, **LAB) as lab:
        vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        oned = OnedClient(make_server(lab.rpc_url, lab.session, 1.0, 3.0))
        store = IncidentStore(redis_client)
        intake = Intake(store, Policy(), check=HostCheck(lambda: oned))
        believed = Intake(store, Policy())  # today's behaviour, for contrast
        before = metric("oneha_event_disagreements_total", source="zmq", event="host_error")
        forged = HostEvent(0, HostState.ERROR, None)
        assert intake.handle(forged, "zmq").outcome is Outcome.UNCONFIRMED
        assert store.open_incident_id("host", 0) is None
        assert metric("oneha_event_disagreements_total", source="zmq", event="host_error") == before + 1
        crash = ReportRequest(Kind.VM_CRASH, vid, 0, 0.0, "zmq", "0", 0)
        assert store.report_many([crash])[0].opened  # not owned: there is no host incident
        # Believed as it came (no check), the same frame opens a host incident that then owns the next crash:
        other = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        assert believed.handle(forged, "zmq").outcome is Outcome.OPENED
        owned = store.report_many([ReportRequest(Kind.VM_CRASH, other, 0, 0.0, "zmq", "0", 0)])[0]
        assert not owned.opened and owned.reason == "owned"


def test_a_real_error_read_before_oned_wrote_it_is_only_delayed(redis_client: redis.Redis) -> None:
    """oned publishes a host's new state before writing it (HostPool::update), so the check's read may see the old
    state and contradict a real ERROR. The reconciler is poked and opens the incident at once, not a full
    reconcile interval (here 60 s) later."""
    from dataclasses import replace

    from oneha.subscriber.reconciler import Reconciler

    with running_lab(hosts=2, **LAB) as lab:
        oned = OnedClient(make_server(lab.rpc_url, lab.session, 1.0, 3.0))

        class RacedOnce:  # the real oned, except that the first host read is from before the ERROR was written
            raced = False

            def host_info(self, hid: int) -> object:
                host = oned.host_info(hid)
                if not RacedOnce.raced:
                    RacedOnce.raced = True
                    return replace(host, state=HostState.MONITORED)
                return host

        store = IncidentStore(redis_client)
        stop = threading.Event()
        reconciler: Reconciler | None = None
        check = HostCheck(lambda: RacedOnce(), on_contradicted_failure=lambda: reconciler.poke())  # type: ignore
        intake = Intake(store, Policy(), check=check)
        reconciler = Reconciler(lambda: oned, intake, store, 60.0, 600.0, stop)
        thread = threading.Thread(target=reconciler.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: reconciler.passes >= 1, 10, what="the first reconcile pass")
            call(lab.rpc_url, "lab.host.kill", 1)
            wait_until(lambda: "<STATE>3</STATE>" in call(lab.rpc_url, "one.host.info", 1), 10, what="ERROR")
            assert intake.handle(HostEvent(1, HostState.ERROR, None), "zmq").outcome is Outcome.UNCONFIRMED
            wait_until(lambda: store.open_incident_id("host", 1), 6, what="the reconciler to open the incident")
        finally:
            stop.set()
            thread.join(5)
