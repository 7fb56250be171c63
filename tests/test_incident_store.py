"""The incident store as the one owner of incident state, against a real Redis: the declared status transitions,
the dispatcher's WAITING -> QUEUED, a host incident's VM bookkeeping, and key shapes taken from `Keys`."""

from __future__ import annotations

import pytest
import redis

from oneha import redisconn
from oneha.incidents import (
    CLOSED_STATUSES,
    TRANSITIONS,
    IncidentStore,
    Kind,
    ReportRequest,
    Status,
    allowed_from,
    is_closed,
)
from oneha.keys import Keys
from oneha.settings import RedisSettings


def store(url: str, prefix: str = "oneha") -> IncidentStore:
    return IncidentStore(redisconn.client(RedisSettings(url=url)), Keys(prefix))


def test_the_transition_table_declares_every_status_and_closed_is_final() -> None:
    assert set(TRANSITIONS) == set(Status)
    assert all(TRANSITIONS[s] == frozenset() for s in CLOSED_STATUSES)
    assert all(TRANSITIONS[s] >= CLOSED_STATUSES for s in Status if s.is_open)
    assert allowed_from(Status.QUEUED) == [Status.WAITING]
    assert Status.QUEUED not in TRANSITIONS[Status.RUNNING]
    assert is_closed("partial") and not is_closed("recovering") and not is_closed("nonsense")


def test_mark_queued_only_from_waiting(redis_url: str) -> None:
    s = store(redis_url)
    inc = s.report(Kind.HOST, 7, 0, grace_s=0, source="zmq").incident_id
    assert s.mark_queued(inc) == "waiting"
    assert s.mark_queued(inc) == "queued"  # a re-dispatch: already queued, left so
    assert s.set_status(inc, Status.RUNNING)
    assert s.mark_queued(inc) == "running"
    assert s.get(inc).status is Status.RUNNING  # type: ignore[union-attr]
    assert s.mark_queued(999_999) is None
    assert not s.r.exists(s.keys.incident(999_999))


def test_the_store_refuses_a_client_returning_bytes(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        IncidentStore(redis.Redis.from_url(redis_url), Keys())


def test_set_status_checks_the_table_in_redis(redis_url: str) -> None:
    s = store(redis_url)
    inc_id = s.report(Kind.HOST, 3, 0, grace_s=0, source="zmq").incident_id
    assert s.set_status(inc_id, Status.RECOVERING, order="[1, 2]", vms_total=2)
    inc = s.get(inc_id)
    assert inc is not None and inc.status is Status.RECOVERING and inc.extra["order"] == "[1, 2]"
    s.close(inc, Status.RECOVERED, "done")
    # A late worker must not reopen what was closed meanwhile: refused, audited, fields untouched.
    assert not s.set_status(inc_id, Status.HELD, "storm guard", order="[9]")
    after = s.get(inc_id)
    assert after is not None and after.status is Status.RECOVERED and after.extra["order"] == "[1, 2]"
    assert s.log(inc_id)[-1]["event"] == "status_refused"
    assert not s.set_status(123_456, Status.RUNNING)  # no such incident: nothing written
    assert not s.r.exists(s.keys.incident(123_456))


def test_vm_bookkeeping_of_a_host_incident(redis_url: str) -> None:
    s = store(redis_url)
    inc_id = s.report(Kind.HOST, 4, 0, grace_s=0, source="zmq").incident_id
    s.add_pending_vms(inc_id, [10, 11])
    s.add_pending_vms(inc_id, [])
    assert s.pending_vms(inc_id) == {10, 11}
    inc, pending = s.get_if_vm_pending(inc_id, 10)
    assert inc is not None and inc.id == inc_id and pending
    pipe = s.r.pipeline(transaction=False)
    s.mark_vm_started(inc_id, 10, pipe)
    pipe.execute()
    assert s.started_vms(inc_id, [10, 11]) == [True, False] and s.started_vms(inc_id, []) == []
    assert not s.finish_vm(inc_id, 10, {"result": "recovered"})
    assert not s.finish_vm(inc_id, 10, {"result": "recovered"})  # a duplicate task does not close twice
    pipe = s.r.pipeline(transaction=False)
    s.audit_on(pipe, inc_id, "vm", vm=11)
    assert s.finish_vm(inc_id, 11, {"result": "failed"}, pipe)  # the last one: the caller closes
    assert s.vm_records(inc_id) == {10: {"result": "recovered"}, 11: {"result": "failed"}}
    assert s.log(inc_id)[-1]["event"] == "vm" and s.pending_vms(inc_id) == set()
    assert s.get_if_vm_pending(inc_id, 11)[1] is False
    assert s.get_if_vm_pending(999_999, 11) == (None, False)


def test_lua_scripts_take_key_shapes_from_keys(redis_url: str) -> None:
    s = store(redis_url, prefix="other")
    k = Keys("other")
    first = s.report(Kind.HOST, 5, 0, grace_s=60, source="zmq")
    s.report(Kind.HOST, 5, 0, grace_s=60, source="bridge")
    assert s.r.hget(k.incident(first.incident_id), "reports") == "2"
    many = s.report_many([ReportRequest(Kind.VM_FAILURE, 8, 0, 1.0, "zmq"), ReportRequest(Kind.HOST, 5, 0, 1, "x")])
    assert [r.opened for r in many] == [True, False]
    assert s.r.hget(k.incident(first.incident_id), "reports") == "3"
    assert s.r.llen(k.incident_log(many[0].incident_id)) == 1
    assert s.cancel_waiting("host", 5, "came back") == first.incident_id
    assert s.r.hget(k.incident(first.incident_id), "status") == "cancelled"
    assert not s.r.keys("oneha:*")  # nothing under the default prefix


def test_a_closed_incident_stays_as_the_first_close_left_it(redis_url: str) -> None:
    s = store(redis_url)
    inc = s.get(s.report(Kind.HOST, 6, 0, grace_s=0, source="zmq").incident_id)
    assert inc is not None
    assert s.close(inc, Status.PARTIAL, "1/2 VMs recovered")
    assert not s.close(inc, Status.RECOVERED, "a late copy of the task")
    after = s.get(inc.id)
    assert after is not None and after.status is Status.PARTIAL and after.detail == "1/2 VMs recovered"
    assert [e["event"] for e in s.log(inc.id)][-2:] == ["closed:partial", "close_refused"]
    assert s.handled_ids("host") == {6: f"{inc.id}:"}


def test_open_incident_ids_and_open_counts(redis_url: str) -> None:
    s = store(redis_url, prefix="counts")
    a = s.report(Kind.HOST, 1, 0, grace_s=60, source="zmq").incident_id
    b = s.report(Kind.VM_CRASH, 9, 0, grace_s=60, source="zmq").incident_id
    s.report(Kind.HOST, 2, 0, grace_s=60, source="zmq")
    assert s.set_status(b, Status.HELD, "storm guard")
    closed = s.get(s.open_incident_ids("host", [2])[0] or 0)
    assert closed is not None and s.close(closed, Status.NO_ACTION, handled=False)
    assert s.open_incident_ids("host", [1, 2, 3]) == [a, None, None] and s.open_incident_ids("host", []) == []
    assert s.open_counts() == {("host", "waiting"): 1, ("vm_crash", "held"): 1}


def test_report_proven_dead_opens_or_joins_one_incident_due_now(redis_url: str) -> None:
    """Contract point 4: a detector's proof opens the host incident (due now) or joins the open one; oned's ERROR
    event arriving later joins it too; a repeat changes nothing but the fields; a handled failure stays handled."""
    s = store(redis_url)
    first = s.report_proven_dead(5, 1, "detector:a", "bmc", fenced=True, detail="BMC read Off", now=1000.0)
    assert first.opened
    inc = s.get(first.incident_id)
    assert inc is not None and inc.status is Status.WAITING and inc.source == "detector:a" and inc.cluster_id == 1
    assert inc.extra["proof"] == "bmc" and inc.extra["fence"] == "detector:bmc"
    assert float(inc.extra["fenced_at"]) == float(inc.extra["proven_dead_at"]) == 1000.0 == inc.due_at
    assert s.r.zscore(s.keys.due, str(first.incident_id)) == 1000.0
    # oned's ERROR event, minutes later, joins it; so does a second detector's proof
    assert s.report(Kind.HOST, 5, 1, grace_s=60, source="zmq").incident_id == first.incident_id
    again = s.report_proven_dead(5, 1, "detector:b", "heartbeat", fenced=True, now=1001.0)
    assert (again.incident_id, again.opened, again.reason) == (first.incident_id, False, "open")
    assert s.get(first.incident_id).extra["proof"] == "heartbeat"  # type: ignore[union-attr]
    assert [e["event"] for e in s.log(first.incident_id)] == ["opened", "proven_dead", "proven_dead"]
    # an ERROR event first (grace running), then the proof: joined and due now instead of after the grace
    joined = s.report(Kind.HOST, 6, 0, grace_s=60, source="zmq", now=2000.0).incident_id
    assert s.report_proven_dead(6, 0, "detector:a", "bmc", fenced=True, now=2001.0).incident_id == joined
    assert s.r.zscore(s.keys.due, str(joined)) == 2001.0
    # closed and handled: a late proof opens nothing and writes nothing
    done = s.get(first.incident_id)
    assert done is not None and s.close(done, Status.RECOVERED)
    late = s.report_proven_dead(5, 1, "detector:a", "bmc", fenced=True)
    assert (late.incident_id, late.opened, late.reason) == (first.incident_id, False, "handled")
    assert s.get(first.incident_id).status is Status.RECOVERED  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="proof"):
        s.report_proven_dead(5, 1, "detector:a", "guess", fenced=False)
