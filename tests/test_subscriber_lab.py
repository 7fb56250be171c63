"""The subscriber against the lab cloud: real XML-RPC (pyone), real one_hm-style events, real Redis."""

from __future__ import annotations

import base64
import contextlib
import time
import xmlrpc.client
from collections.abc import Iterator

import zmq

from oneha.incidents import Kind
from oneha.opennebula import HOST_PREFIXES, HostState, OnedClient, make_server
from oneha.subscriber.service import Service
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_bridge import bridge
from tests.test_subscriber_kit import host_message, incidents, metric, publisher, settings


@contextlib.contextmanager
def services(n: int, s: object) -> Iterator[list[Service]]:
    started = [Service(s).start() for _ in range(n)]  # type: ignore[arg-type]
    try:
        yield started
    finally:
        for svc in started:
            svc.stop()


def toggle_until_heard(rpc_url: str, svcs: list[Service], hid: int) -> None:
    """Disable/enable a spare host until every listener has received a host event (PUB/SUB joins late)."""
    def heard() -> bool:
        call(rpc_url, "one.host.status", hid, 1)
        call(rpc_url, "one.host.status", hid, 0)
        return all(s.listener.received > 0 for s in svcs)

    wait_until(heard, 10, interval_s=0.05, max_interval_s=0.1, what="listeners subscribed")


def oned(lab_rpc: str, session: str) -> OnedClient:
    return OnedClient(make_server(lab_rpc, session, 1.0, 3.0))


def test_one_incident_from_three_subscribers_bridge_reconciler_and_repeats(redis_url: str) -> None:
    with running_lab(hosts=3, vms=6) as lab, publisher() as (pub, extra_url):
        s = settings(redis_url, [lab.events_url, extra_url], rpc_url=lab.rpc_url, session=lab.session,
                     host_grace_s=60, vm_crash_grace_s=60)
        with services(3, s) as svcs:
            toggle_until_heard(lab.rpc_url, svcs, 2)
            spy = zmq.Context.instance().socket(zmq.SUB)
            spy.setsockopt(zmq.LINGER, 0)
            for prefix in HOST_PREFIXES:
                spy.setsockopt(zmq.SUBSCRIBE, prefix)
            spy.connect(lab.events_url)
            try:
                wait_until(lambda: (call(lab.rpc_url, "one.host.status", 2, 1), spy.poll(50))[1], 10,
                           what="spy subscribed")
                call(lab.rpc_url, "one.host.status", 2, 0)
                call(lab.rpc_url, "lab.host.kill", 1)
                error_key = b"EVENT STATE HOST/ERROR//1 "
                captured: list[list[bytes]] = []

                def got_error() -> bool:
                    while spy.poll(10):
                        frames = spy.recv_multipart()
                        if frames[0] == error_key:
                            captured.append(frames)
                    return bool(captured)

                wait_until(got_error, 10, what="host 1 ERROR event")
            finally:
                spy.close()
            # Ten repeats of the event, from a second "front-end" every subscriber listens to.
            for _ in range(10):
                pub.send_multipart(captured[0])
            # The bridge, both ways, ten times each.
            xml = xmlrpc.client.ServerProxy(lab.rpc_url).one.host.info(lab.session, 1)[1]
            template = base64.b64encode(xml.encode()).decode()
            for _ in range(10):
                assert bridge("--hid", "1", url=redis_url).returncode == 0
                assert bridge(template, url=redis_url).returncode == 0
            # And the reconcilers, a few passes each.
            passes = [sv.reconciler.passes for sv in svcs]
            wait_until(lambda: all(sv.reconciler.passes >= p + 2 for sv, p in zip(svcs, passes, strict=True)), 10,
                       what="reconcile passes")
            wait_until(lambda: sum(i.reports for i in incidents(redis_url) if i.kind == Kind.HOST) >= 3 * 10 + 20,
                       10, what="all reports counted")
            hosts = [i for i in incidents(redis_url) if i.kind == Kind.HOST]
            assert len(hosts) == 1 and hosts[0].resource_id == 1
            sources = {"zmq", "bridge", "reconciler"}
            assert hosts[0].source in sources
            # Every VM of host 1 went UNKNOWN because its host failed: the host incident owns them, so no crash
            # incident of their own (the reports were counted as owned), however many times seen.
            assert oned(lab.rpc_url, lab.session).host_info(1).vm_ids
            assert [i for i in incidents(redis_url) if i.kind == Kind.VM_CRASH] == []
            assert metric("oneha_events_ignored_total", reason="owned_by_host") > 0


def test_reconciler_opens_the_incident_when_events_are_dropped(redis_url: str) -> None:
    with running_lab(hosts=3, vms=3) as lab:
        call(lab.rpc_url, "lab.faults", {"event_drop_rate": 1.0})
        s = settings(redis_url, [lab.events_url], rpc_url=lab.rpc_url, session=lab.session, host_grace_s=60)
        interval = s.subscriber.reconcile_interval_s
        with services(1, s):
            client = oned(lab.rpc_url, lab.session)
            call(lab.rpc_url, "lab.host.kill", 2)
            wait_until(lambda: client.host_info(2).state == HostState.ERROR, 10, interval_s=0.02, what="ERROR")
            seen_error = time.monotonic()
            wait_until(lambda: any(i.kind == Kind.HOST for i in incidents(redis_url)), interval + 2,
                       interval_s=0.02, what="incident from the reconciler")
            took = time.monotonic() - seen_error
            inc = next(i for i in incidents(redis_url) if i.kind == Kind.HOST)
            assert inc.source == "reconciler" and inc.resource_id == 2
            print(f"\nreconciler opened the incident {took:.2f}s after ERROR (interval {interval}s)")
            assert lab.events is not None and lab.events.dropped > 0


def test_subscriber_down_during_failure_and_disabled_host(redis_url: str) -> None:
    """Failures that happened while no subscriber ran, including a DISABLED host whose VMs went UNKNOWN
    (no host event at all), are found by the first reconcile pass."""
    with running_lab(hosts=4, vms=8) as lab:
        client = oned(lab.rpc_url, lab.session)
        call(lab.rpc_url, "one.host.status", 3, 1)  # disabled by an operator...
        call(lab.rpc_url, "lab.host.kill", 3)  # ...then it dies: its VMs go UNKNOWN, the host stays DISABLED
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: client.host_info(1).state == HostState.ERROR, 10, what="host 1 ERROR")
        lost = sorted(client.host_info(3).vm_ids)
        wait_until(lambda: all(v.lcm_state.name == "UNKNOWN" for v in client.vm_pool_set(lost)), 10,
                   what="VMs of the disabled host UNKNOWN")
        assert client.host_info(3).state == HostState.DISABLED
        s = settings(redis_url, [lab.events_url], rpc_url=lab.rpc_url, session=lab.session, host_grace_s=60)
        with services(1, s) as (svc,):
            wait_until(lambda: svc.reconciler.passes >= 1, 10, what="first pass")
            found = incidents(redis_url)
            assert [i.resource_id for i in found if i.kind == Kind.HOST] == [1]
            crashed = {i.resource_id for i in found if i.kind == Kind.VM_CRASH}
            assert set(lost) <= crashed
            assert all(i.source == "reconciler" for i in found)


def test_raft_front_ends_only_the_leader_publishes_and_the_leader_moves(redis_url: str) -> None:
    """Three front-ends in the subscriber's list, as in an OpenNebula Raft HA cluster: one is down, one (the lab)
    is the leader and publishes, one is a follower. The leader's ERROR event becomes an incident; then the leader
    moves to the front-end that was down (it starts and publishes), and its events are heard too."""
    from oneha.redis_server import free_port

    down_port = free_port()
    with running_lab(hosts=3, vms=3) as lab, publisher() as (_follower, follower_url):
        down_url = f"tcp://127.0.0.1:{down_port}"
        s = settings(redis_url, [down_url, lab.events_url, follower_url], rpc_url=lab.rpc_url, session=lab.session,
                     host_grace_s=60)
        with services(1, s) as svcs:
            toggle_until_heard(lab.rpc_url, svcs, 2)
            call(lab.rpc_url, "lab.host.kill", 1)
            wait_until(lambda: any(i.resource_id == 1 and i.source == "zmq" for i in incidents(redis_url)), 10,
                       what="incident from the leader's event")
            # Leader change: the lab stops publishing, the front-end that was down comes up and publishes.
            lab.stop()
            new_leader = zmq.Context.instance().socket(zmq.PUB)
            new_leader.setsockopt(zmq.LINGER, 0)
            new_leader.bind(down_url)
            try:
                key, content = host_message(7, "ERROR", 3)
                wait_until(lambda: (new_leader.send_multipart([key, content]),
                                    any(i.resource_id == 7 for i in incidents(redis_url)))[1], 15,
                           interval_s=0.1, what="incident from the new leader's event")
            finally:
                new_leader.close()
