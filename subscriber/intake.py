"""Event -> policy -> IncidentStore.report: the one path every input (ZeroMQ, bridge stream, reconciler) takes,
so that however and however often a failure is seen, it collapses into the same incident (the dedup is in Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from oneha.incidents import IncidentStore, Kind
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
from subscriber import metrics
from subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.intake")


class Outcome(StrEnum):
    OPENED = "opened"
    DUPLICATE = "duplicate"  # collapsed into an open incident or a handled failure
    CANCELLED = "cancelled"  # a host back within its grace period
    HEALTHY = "healthy"  # host healthy, nothing was waiting
    IGNORED = "ignored"  # a state that is not a failure
    OPTED_OUT = "opted_out"
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
    """

    def __init__(self, store: IncidentStore, policy: Policy, on_opened: threading.Event | None = None) -> None:
        self.store = store
        self.policy = policy
        self.on_opened = on_opened

    def handle(self, event: Event, source: str, received_at: float | None = None) -> Result:
        """Report or cancel as the event says. Redis errors propagate: the caller buffers or retries."""
        received_at = time.time() if received_at is None else received_at
        metrics.EVENTS_RECEIVED.labels(source, event_kind(event)).inc()
        result = self._host(event, source) if isinstance(event, HostEvent) else self._vm(event, source)
        if result.outcome in (Outcome.OPENED, Outcome.DUPLICATE):
            metrics.ENQUEUE_LATENCY.observe(max(0.0, time.time() - received_at))
        return result

    def _host(self, event: HostEvent, source: str) -> Result:
        if event.state in HOST_HEALTHY_STATES:
            cancelled = self.store.cancel_waiting("host", event.host_id, f"host back to {event.state.name}")
            self.store.clear_handled("host", [event.host_id])
            if cancelled is not None:
                metrics.INCIDENTS_CANCELLED.labels(Kind.HOST.value).inc()
                log.info("incident cancelled", extra=kv(incident=cancelled, host=event.host_id, source=source))
                return Result(Outcome.CANCELLED, cancelled)
            return Result(Outcome.HEALTHY)
        if event.state not in HOST_FAILED_STATES:
            # DISABLED / OFFLINE are operator decisions, never a failure; their VMs are covered by the reconciler.
            return Result(Outcome.IGNORED)
        cluster = event.host.cluster_id if event.host is not None else -1
        # host_action "none" still opens the incident: the worker fences and reports (settings: "fence and
        # report only"); it just recovers no VM.
        grace = self.policy.for_cluster(cluster).host_grace_s
        return self._report(Kind.HOST, event.host_id, cluster, grace, source, "")

    def _vm(self, event: VmEvent, source: str) -> Result:
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
        grace = policy.vm_crash_grace_s if kind is Kind.VM_CRASH else policy.vm_failure_grace_s
        if action == "none":
            metrics.EVENTS_IGNORED.labels("policy_none").inc()
            return Result(Outcome.POLICY_NONE)
        # The history sequence tells failure episodes apart: a VM redeployed since its last incident fails anew.
        token = str(vm.history_seq) if vm is not None else ""
        return self._report(kind, event.vm_id, cluster, grace, source, token)

    def _report(self, kind: Kind, rid: int, cluster: int, grace: float, source: str, token: str) -> Result:
        rep = self.store.report(kind, rid, cluster, grace, source, token)
        if not rep.opened:
            metrics.DUPLICATES.labels(source).inc()
            return Result(Outcome.DUPLICATE, rep.incident_id)
        metrics.INCIDENTS_OPENED.labels(kind.value).inc()
        log.info("incident opened", extra=kv(incident=rep.incident_id, kind=kind.value, resource=rid,
                                             cluster=cluster, grace_s=grace, source=source))
        if self.on_opened is not None and grace <= 0:
            self.on_opened.set()
        return Result(Outcome.OPENED, rep.incident_id)
