"""The incident store against a real Redis: deduplication, cancellation, handled markers, due-time claims."""

from __future__ import annotations

import threading

import redis

from oneha.incidents import IncidentStore, Kind, Status


def store(url: str) -> IncidentStore:
    return IncidentStore(redis.Redis.from_url(url, decode_responses=True))


def test_reports_of_one_failure_collapse_into_one_incident(redis_url: str) -> None:
    s = store(redis_url)
    first = s.report(Kind.HOST, 3, 0, grace_s=5, source="zmq")
    again = [s.report(Kind.HOST, 3, 0, grace_s=5, source=src) for src in ("zmq", "bridge", "reconcile")]
    assert first.opened
    assert all(not r.opened and r.incident_id == first.incident_id and r.reason == "open" for r in again)
    inc = s.get(first.incident_id)
    assert inc is not None and inc.reports == 4 and inc.status is Status.WAITING


def test_concurrent_reporters_open_exactly_one(redis_url: str) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def reporter() -> None:
        s = store(redis_url)
        for _ in range(20):
            r = s.report(Kind.VM_CRASH, 42, 0, grace_s=1, source="zmq", token="1")
            with lock:
                results.append(r.opened)

    threads = [threading.Thread(target=reporter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(results) == 160


def test_cancel_only_during_grace_and_a_new_failure_opens_a_new_incident(redis_url: str) -> None:
    s = store(redis_url)
    first = s.report(Kind.HOST, 5, 1, grace_s=60, source="zmq").incident_id
    assert s.cancel_waiting("host", 5, "came back") == first
    assert s.get(first).status is Status.CANCELLED  # type: ignore[union-attr]
    second = s.report(Kind.HOST, 5, 1, grace_s=60, source="zmq")
    assert second.opened and second.incident_id != first
    s.set_status(second.incident_id, Status.RUNNING)
    assert s.cancel_waiting("host", 5, "came back") is None  # a running flow decides for itself


def test_handled_marker_suppresses_until_cleared(redis_url: str) -> None:
    s = store(redis_url)
    rep = s.report(Kind.HOST, 7, 0, grace_s=0, source="zmq")
    s.close(s.get(rep.incident_id), Status.RECOVERED)  # type: ignore[arg-type]
    again = s.report(Kind.HOST, 7, 0, grace_s=0, source="reconcile")
    assert not again.opened and again.reason == "handled"
    assert s.clear_handled("host", [7]) == 1
    assert s.report(Kind.HOST, 7, 0, grace_s=0, source="zmq").opened


def test_vm_handled_marker_is_per_deployment(redis_url: str) -> None:
    s = store(redis_url)
    rep = s.report(Kind.VM_FAILURE, 9, 0, grace_s=0, source="zmq", token="4")
    s.close(s.get(rep.incident_id), Status.FAILED, handled_token="4")  # type: ignore[arg-type]
    assert not s.report(Kind.VM_FAILURE, 9, 0, grace_s=0, source="zmq", token="4").opened
    assert s.report(Kind.VM_FAILURE, 9, 0, grace_s=0, source="zmq", token="5").opened


def test_due_incidents_are_claimed_once_per_lease(redis_url: str) -> None:
    s = store(redis_url)
    now = 1000.0
    a = s.report(Kind.HOST, 1, 0, grace_s=5, source="zmq", now=now).incident_id
    b = s.report(Kind.HOST, 2, 0, grace_s=50, source="zmq", now=now).incident_id
    assert s.claim_due(lease_s=30, now=now + 1) == []
    assert s.claim_due(lease_s=30, now=now + 6) == [a]
    assert s.claim_due(lease_s=30, now=now + 7) == []  # leased
    assert sorted(s.claim_due(lease_s=30, now=now + 60)) == [a, b]  # lease ran out: dispatched again


def test_a_crashed_vm_of_a_host_with_an_open_incident_is_the_host_incidents(redis_url: str) -> None:
    s = store(redis_url)
    host = s.report(Kind.HOST, 3, 0, grace_s=60, source="zmq").incident_id
    owned = s.report(Kind.VM_CRASH, 42, 0, grace_s=60, source="zmq", token="1", owner_host=3)
    assert not owned.opened and owned.reason == "owned" and owned.incident_id == host
    assert s.report(Kind.VM_CRASH, 43, 0, grace_s=60, source="zmq", token="1", owner_host=4).opened  # other host
    s.cancel_waiting("host", 3, "back")
    assert s.report(Kind.VM_CRASH, 42, 0, grace_s=60, source="zmq", token="1", owner_host=3).opened


def test_incident_ids_do_not_repeat_after_redis_comes_back_empty(redis_url: str) -> None:
    """Audit records from before and after an empty Redis restart must not collide: ids go on from the time."""
    from oneha.incidents import ReportRequest
    from oneha.waiting import wait_until

    s = store(redis_url)
    before = [r.incident_id for r in s.report_many([ReportRequest(Kind.VM_FAILURE, v, 0, 0.0, "t") for v in range(5)])]
    before.append(s.report(Kind.HOST, 1, 0, 0.0, "t").incident_id)

    def redis_ms() -> int:
        sec, usec = s.r.time()
        return int(sec) * 1000 + int(usec) // 1000

    wait_until(lambda: redis_ms() > before[0] + len(before) + 1735689600 * 1000, 2, interval_s=0.001,
               what="Redis time past the ids handed out (at most 1000 a second)")
    s.r.flushall()  # Redis restarted without its data
    after = s.report(Kind.HOST, 1, 0, 0.0, "t").incident_id
    assert after > max(before), (before, after)
    assert len(str(after)) <= 12  # still a readable number
