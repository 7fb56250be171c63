"""The subscriber's batched hot path: IncidentStore.report_many (one Lua call per chunk, audit written in Redis)
behaves exactly like report() one by one, and Intake.handle_many logs every incident it opens, bursts included."""

from __future__ import annotations

import logging

import pytest
import redis

from oneha import incidents
from oneha.incidents import IncidentStore, Kind, Report, ReportRequest
from oneha.opennebula import LcmState, VmEvent, VmState, VmView
from oneha.settings import Policy
from oneha.subscriber import intake as intake_mod
from oneha.subscriber.intake import Intake, Outcome


def stores(url: str) -> tuple[IncidentStore, IncidentStore]:
    return (IncidentStore(redis.Redis.from_url(url, decode_responses=True)),
            IncidentStore(redis.Redis.from_url(url, decode_responses=True), incidents.Keys("other")))


def test_report_many_matches_report_one_by_one(redis_url: str) -> None:
    one, many = stores(redis_url)  # same Redis, two key prefixes: the two paths must leave the same state
    plan = [ReportRequest(Kind.VM_CRASH, 1, 0, 0.0, "zmq", "3"),
            ReportRequest(Kind.VM_CRASH, 1, 0, 0.0, "bridge", "3"),  # same failure, same batch: duplicate
            ReportRequest(Kind.HOST, 7, 2, 30.0, "reconcile"),
            ReportRequest(Kind.VM_FAILURE, 2, 1, 5.0, "zmq", "0")]
    expect = [one.report(q.kind, q.resource_id, q.cluster_id, q.grace_s, q.source, q.token) for q in plan]
    got = many.report_many(plan)
    assert [(r.opened, r.reason) for r in got] == [(r.opened, r.reason) for r in expect]
    assert got[1].incident_id == got[0].incident_id
    for a, b in zip(expect, got, strict=True):
        x, y = one.get(a.incident_id), many.get(b.incident_id)
        assert x is not None and y is not None
        assert (x.kind, x.resource_id, x.cluster_id, x.status, x.source, x.reports, x.extra) == (
            y.kind, y.resource_id, y.cluster_id, y.status, y.source, y.reports, y.extra)
        assert y.due_at - y.opened_at == pytest.approx(x.due_at - x.opened_at)
        assert [(e["event"], e["source"], e["grace_s"]) for e in many.log(b.incident_id)] == \
               [(e["event"], e["source"], e["grace_s"]) for e in one.log(a.incident_id)]


def test_report_many_respects_handled_markers_and_tokens(redis_url: str) -> None:
    s, _ = stores(redis_url)
    first = s.report_many([ReportRequest(Kind.VM_CRASH, 5, 0, 0.0, "zmq", "1")])[0]
    inc = s.get(first.incident_id)
    assert inc is not None
    s.close(inc, incidents.Status.RECOVERED, handled_token="1")
    again, redeployed = s.report_many([ReportRequest(Kind.VM_CRASH, 5, 0, 0.0, "zmq", "1"),
                                       ReportRequest(Kind.VM_CRASH, 5, 0, 0.0, "zmq", "2")])
    assert again == Report(first.incident_id, False, "handled")
    assert redeployed.opened and redeployed.incident_id != first.incident_id


def test_report_many_chunks_large_bursts(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incidents, "REPORT_CHUNK", 7)
    s, _ = stores(redis_url)
    plan = [ReportRequest(Kind.VM_CRASH, i % 20, 0, 0.0, "zmq", "0") for i in range(50)]
    got = s.report_many(plan)
    assert sum(r.opened for r in got) == 20 and len({r.incident_id for r in got}) == 20
    assert all(s.log(r.incident_id)[0]["event"] == "opened" for r in got)
    assert s.report_many([]) == []


def vm_event(vid: int) -> VmEvent:
    vm = VmView(vid, f"vm{vid}", VmState.ACTIVE, LcmState.UNKNOWN, 1, "h1", 0, cluster_id=0, history_seq=0)
    return VmEvent(vid, VmState.ACTIVE, LcmState.UNKNOWN, vm)


def test_every_opened_incident_is_logged_even_in_a_burst(redis_url: str, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake_mod, "LOG_CHUNK", 10)
    s, _ = stores(redis_url)
    intake = Intake(s, Policy())
    caplog.set_level(logging.INFO, logger="oneha.subscriber.intake")
    few = intake.handle_many([(vm_event(i), "zmq", 0.0) for i in range(3)])
    burst = intake.handle_many([(vm_event(i), "zmq", 0.0) for i in range(3, 28)] + [(vm_event(0), "zmq", 0.0)])
    assert [r.outcome for r in few] == [Outcome.OPENED] * 3
    assert [r.outcome for r in burst] == [Outcome.OPENED] * 25 + [Outcome.DUPLICATE]
    logged: list[int] = []
    for rec in caplog.records:
        fields = getattr(rec, "kv", {})
        if rec.getMessage() == "incident opened":
            logged.append(fields["incident"])
        elif rec.getMessage() == "incidents opened":
            assert fields["count"] == len(fields["incidents"]) <= 10
            assert {"kind", "resource", "cluster", "grace_s", "source"} <= set(fields["incidents"][0])
            logged.extend(f["incident"] for f in fields["incidents"])
    assert sorted(logged) == sorted(r.incident_id for r in few + burst[:25])
