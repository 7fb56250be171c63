"""The ZeroMQ input end to end over real sockets: a test PUB socket, a running service, a real Redis."""

from __future__ import annotations

import redis

from oneha.incidents import Kind, Status
from oneha.keys import HOST_QUEUE, VM_QUEUE
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import (
    host_message,
    host_message_object_form,
    incidents,
    metric,
    publisher,
    running,
    settings,
    sync,
    vm_message,
)
from tests.test_subscriber_lab import toggle_until_heard


def test_repeats_and_both_key_forms_make_one_host_incident(redis_url: str) -> None:
    with publisher() as (pub, url), running(settings(redis_url, [url], host_grace_s=30)) as svc:
        sync(pub, svc)
        for _ in range(10):
            pub.send_multipart(list(host_message(3, "ERROR", 3, cluster=0)))
            pub.send_multipart(list(host_message_object_form(3, "ERROR", 3)))  # not subscribed: ignored
        wait_until(lambda: (found := incidents(redis_url)) and found[0].reports >= 10, 5, what="ten reports")
        found = incidents(redis_url)
        assert len(found) == 1
        inc = found[0]
        assert (inc.kind, inc.resource_id, inc.status, inc.source) == (Kind.HOST, 3, Status.WAITING, "zmq")
        assert inc.reports == 10  # only the subscribed STATE form arrives


def test_host_back_within_grace_cancels_and_sends_no_task(redis_url: str, redis_client: redis.Redis) -> None:
    """A host back within its grace period cancels the incident: the MONITORED event is a hint, oned (the lab) is
    asked and agrees. Events alone cancel nothing (test_subscriber_forged)."""
    with running_lab(hosts=3) as lab, running(settings(redis_url, [lab.events_url], rpc_url=lab.rpc_url,
                                                       session=lab.session, host_grace_s=3.0),
                                              ("zmq", "dispatcher")) as svc:
        toggle_until_heard(lab.rpc_url, [svc], 2)
        before = metric("oneha_incidents_cancelled_total", kind="host")
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: incidents(redis_url), 5, what="incident")
        call(lab.rpc_url, "lab.host.revive", 1)
        wait_until(lambda: incidents(redis_url)[0].status == Status.CANCELLED, 5, what="cancel")
        # Well past the grace period with the dispatcher running: nothing may have been sent.
        svc.stop_event.wait(3.0)
        assert redis_client.llen(HOST_QUEUE) == 0
        assert metric("oneha_incidents_cancelled_total", kind="host") == before + 1
        # A later failure of the same host is a new incident.
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: len(incidents(redis_url)) == 2, 5, what="second incident")


def test_vm_failure_with_no_grace_is_sent_at_once(redis_url: str, redis_client: redis.Redis) -> None:
    with publisher() as (pub, url), running(settings(redis_url, [url]), ("zmq", "dispatcher")) as svc:
        sync(pub, svc)
        pub.send_multipart(list(vm_message(42, "BOOT_FAILURE", 36, hid=1, seq=2)))
        wait_until(lambda: redis_client.llen(VM_QUEUE) == 1, 5, what="vm task")
        inc = incidents(redis_url)[0]
        assert (inc.kind, inc.resource_id, inc.status, inc.extra["token"]) == (Kind.VM_FAILURE, 42, Status.QUEUED, "2")
        body = redis_client.lindex(VM_QUEUE, 0)
        assert body is not None and "oneha.vm_incident" in body and f"[{inc.id}]" in body.replace(" ", "")


def test_opt_out_and_policy_none_are_not_reported(redis_url: str) -> None:
    s = settings(redis_url, vm_crash_action="none")
    with publisher() as (pub, url), running(settings(redis_url, [url], vm_crash_action="none")) as svc:
        assert s.policy.default.vm_crash_action == "none"
        sync(pub, svc)
        opted = metric("oneha_events_ignored_total", reason="opted_out")
        none = metric("oneha_events_ignored_total", reason="policy_none")
        pub.send_multipart(list(vm_message(7, "PROLOG_FAILURE", 39, user={"HA": "NO"})))
        pub.send_multipart(list(vm_message(8, "UNKNOWN", 16)))
        pub.send_multipart(list(vm_message(9, "EPILOG_FAILURE", 40)))  # a marker that the others went by
        wait_until(lambda: incidents(redis_url), 5, what="vm 9 incident")
        assert [i.resource_id for i in incidents(redis_url)] == [9]
        assert metric("oneha_events_ignored_total", reason="opted_out") == opted + 1
        assert metric("oneha_events_ignored_total", reason="policy_none") == none + 1
