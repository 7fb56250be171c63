"""Event -> policy -> IncidentStore.report: the one path every input (ZeroMQ, bridge stream, reconciler) takes,
so that however and however often a failure is seen, it collapses into the same incident (the dedup is in Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from oneha.incidents import IncidentStore, Kind, ReportRequest
from oneha.opennebula import (
    FAILURE_LCM_STATES,
    HOST_FAILED_STATES,
    HOST_HEALTHY_STATES,
    Event,
    HostEvent,
    LcmState,
    VmEvent,
    VmState,
)
from oneha.settings import Policy
from oneha.subscriber import metrics
from oneha.subscriber.hostcheck import HostCheck
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.intake")

# Every incident opened is logged. A flush that opens more than LOG_EACH (a host failure taking its VMs down, the
# first pass of the reconciler) logs them LOG_CHUNK to a line, with the same fields per incident: one JSON line per
# incident cost ~15 us each, a third of the cost of opening one, right in the burst where latency matters most.
LOG_EACH = 5
LOG_CHUNK = 100
RECONCILER = "reconciler"  # the source whose host events are oned's own pool read


class Outcome(StrEnum):
    OPENED = "opened"
    DUPLICATE = "duplicate"  # collapsed into an open incident or a handled failure
    CANCELLED = "cancelled"  # a host back within its grace period
    HEALTHY = "healthy"  # host healthy, nothing was waiting
    IGNORED = "ignored"  # a state that is not a failure
    OPTED_OUT = "opted_out"
    OWNED = "owned"  # a crashed VM whose host has an open incident: the host flow recovers it
    UNCONFIRMED = "unconfirmed"  # a host event oned contradicts (or, for "back", cannot confirm): not acted on
    POLICY_NONE = "policy_none"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    incident_id: int | None = None


def event_kind(event: Event) -> str:
    """Metric label of an event: small fixed set."""
    if isinstance(event, HostEvent):
        if event.state in HOST_FAILED_STATES:
            return "host_error"
        return "host_healthy" if event.state in HOST_HEALTHY_STATES else "host_other"
    kind = failure_kind(event)
    return kind.value if kind is not None else "vm_other"


def failure_kind(event: VmEvent) -> Kind | None:
    if event.state == VmState.POWEROFF:
        # the same road as a crash: the body tells an unrequested poweroff (see MONITOR_ACTION) from an operator's
        return Kind.VM_CRASH if event.vm is not None and event.vm.unrequested_poweroff else None
    if event.state != VmState.ACTIVE:
        return None
    if event.lcm_state == LcmState.UNKNOWN:
        return Kind.VM_CRASH
    if event.lcm_state in FAILURE_LCM_STATES:
        return Kind.VM_FAILURE
    return None


class Intake:
    """Stateless apart from the store; safe to share between threads.

    `on_opened` is called with the grace period of every incident opened, so the dispatcher can wake at once for
    incidents that are due immediately (VM failures have no grace by default).

    With `check`, host events are hints (subscriber/hostcheck.py): one opens or cancels a host incident only if
    oned agrees when asked. The reconciler's events are oned's own answer and are not asked about again.
    """

    def __init__(self, store: IncidentStore, policy: Policy, on_opened: threading.Event | None = None,
                 check: HostCheck | None = None) -> None:
        self.store = store
        self.policy = policy
        self.on_opened = on_opened
        self.check = check

    def handle(self, event: Event, source: str, received_at: float | None = None) -> Result:
        """Report or cancel as the event says. Redis errors propagate: the caller buffers or retries."""
        return self.handle_many([(event, source, time.time() if received_at is None else received_at)])[0]

    def handle_many(self, batch: Sequence[tuple[Event, str, float]]) -> list[Result]:
        """Several events in order, their reports pipelined into as few Redis round trips as order allows.

        A burst (a host failing takes all its VMs to UNKNOWN at once) costs one round trip, not one per event.
        Cancellations are applied in sequence, after the reports queued before them.
        """
        results: list[Result | None] = [None] * len(batch)
        queued: list[tuple[int, ReportRequest, float]] = []
        received: Counter[tuple[str, str]] = Counter()
        for event, source, _ in batch:
            received[(source, event_kind(event))] += 1
        for (source, kind), n in received.items():
            metrics.EVENTS_RECEIVED.labels(source, kind).inc(n)
        for i, (event, source, received_at) in enumerate(batch):
            planned = self._plan(event, source, received_at)
            if isinstance(planned, ReportRequest):
                queued.append((i, planned, received_at))
                continue
            if isinstance(event, HostEvent) and event.state in HOST_HEALTHY_STATES:
                self._flush(queued, results)
                planned = self._healthy(event, source, received_at)
            results[i] = planned
        self._flush(queued, results)
        return [r if r is not None else Result(Outcome.IGNORED) for r in results]

    def _plan(self, event: Event, source: str, received_at: float) -> ReportRequest | Result:
        if isinstance(event, HostEvent):
            return self._plan_host(event, source, received_at)
        return self._plan_vm(event, source)

    def _plan_host(self, event: HostEvent, source: str, received_at: float) -> ReportRequest | Result:
        if event.state not in HOST_FAILED_STATES:
            # DISABLED / OFFLINE are operator decisions, never a failure; their VMs are covered by the reconciler.
            # (Healthy states are handled by the caller, in order.)
            return Result(Outcome.IGNORED)
        if self._oned_says(event, source, received_at) is False:
            return Result(Outcome.UNCONFIRMED)  # oned says it is healthy: nothing to open (unreadable: open)
        cluster = event.host.cluster_id if event.host is not None else -1
        # host_action "none" still opens the incident: the worker fences and reports (settings: "fence and
        # report only"); it just recovers no VM.
        grace = self.policy.for_cluster(cluster).host_grace_s
        return ReportRequest(Kind.HOST, event.host_id, cluster, grace, source, "")

    def _plan_vm(self, event: VmEvent, source: str) -> ReportRequest | Result:
        kind = failure_kind(event)
        if kind is None:
            return Result(Outcome.IGNORED)
        vm = event.vm
        if vm is not None and vm.ha_opt_out:
            metrics.EVENTS_IGNORED.labels("opted_out").inc()
            return Result(Outcome.OPTED_OUT)
        cluster = vm.cluster_id if vm is not None else -1
        policy = self.policy.for_cluster(cluster)
        action: str = policy.vm_crash_action if kind is Kind.VM_CRASH else policy.vm_failure_action
        if event.state == VmState.POWEROFF:
            action = "none" if policy.vm_poweroff_action == "off" else policy.vm_poweroff_action
        grace = policy.vm_crash_grace_s if kind is Kind.VM_CRASH else policy.vm_failure_grace_s
        if action == "none":
            metrics.EVENTS_IGNORED.labels("policy_none").inc()
            return Result(Outcome.POLICY_NONE)
        # The history sequence tells failure episodes apart: a VM redeployed since its last incident fails anew.
        token = str(vm.history_seq) if vm is not None else ""
        owner = vm.hid if vm is not None and kind is Kind.VM_CRASH else None
        return ReportRequest(kind, event.vm_id, cluster, grace, source, token, owner)

    def _oned_says(self, event: HostEvent, source: str, received_at: float) -> bool | None:
        """Does oned agree with this host event? True when events are believed; None when oned cannot say."""
        if self.check is None or source == RECONCILER:
            return True
        return self.check.confirms(event, source, received_at)

    def _healthy(self, event: HostEvent, source: str, received_at: float) -> Result:
        if self.check is not None and source != RECONCILER:
            if not self.store.has_open_or_handled("host", event.host_id):
                return Result(Outcome.HEALTHY)  # nothing to cancel or forget: oned need not be asked
            if not self._oned_says(event, source, received_at):
                # oned says the host is not back, or cannot say: the incident and the handled marker stay (a
                # forged "back" must neither cancel a grace period nor make a recovered host be fenced again).
                return Result(Outcome.UNCONFIRMED)
        cancelled = self.store.cancel_waiting("host", event.host_id, f"host back to {event.state.name}")
        self.store.clear_handled("host", [event.host_id])
        if cancelled is None:
            return Result(Outcome.HEALTHY)
        metrics.INCIDENTS_CANCELLED.labels(Kind.HOST.value).inc()
        log.info("incident cancelled", extra=kv(incident=cancelled, host=event.host_id, source=source))
        return Result(Outcome.CANCELLED, cancelled)

    def _flush(self, queued: list[tuple[int, ReportRequest, float]], results: list[Result | None]) -> None:
        if not queued:
            return
        reports = self.store.report_many([q for _, q, _ in queued])
        done = time.time()
        opened: list[tuple[int, ReportRequest]] = []
        duplicates: Counter[str] = Counter()
        owned = 0
        observe = metrics.ENQUEUE_LATENCY.observe
        for (i, q, received_at), rep in zip(queued, reports, strict=True):
            observe(max(0.0, done - received_at))
            if rep.opened:
                opened.append((rep.incident_id, q))
                results[i] = Result(Outcome.OPENED, rep.incident_id)
            elif rep.reason == "owned":
                owned += 1
                results[i] = Result(Outcome.OWNED, rep.incident_id)
            else:
                duplicates[q.source] += 1
                results[i] = Result(Outcome.DUPLICATE, rep.incident_id)
        queued.clear()
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)
        if owned:
            metrics.EVENTS_IGNORED.labels("owned_by_host").inc(owned)
        if not opened:
            return
        for kind, n in Counter(q.kind.value for _, q in opened).items():
            metrics.INCIDENTS_OPENED.labels(kind).inc(n)
        _log_opened(opened)
        if self.on_opened is not None and any(q.grace_s <= 0 for _, q in opened):
            self.on_opened.set()


def _fields(incident_id: int, q: ReportRequest) -> dict[str, object]:
    return {"incident": incident_id, "kind": q.kind.value, "resource": q.resource_id, "cluster": q.cluster_id,
            "grace_s": q.grace_s, "source": q.source}


def _log_opened(opened: list[tuple[int, ReportRequest]]) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    if len(opened) <= LOG_EACH:
        for incident_id, q in opened:
            log.info("incident opened", extra={"kv": _fields(incident_id, q)})
        return
    for start in range(0, len(opened), LOG_CHUNK):
        chunk = opened[start:start + LOG_CHUNK]
        log.info("incidents opened", extra=kv(count=len(chunk), incidents=[_fields(i, q) for i, q in chunk]))
