"""Cross-cutting concerns in one place: Prometheus metrics and the audit trail (the dramatiq-middleware idea).

Flows never touch a metric or write an audit entry themselves:
- steps are wrapped with `@step("name")`: the wrapper writes `step` audit entries (name, result, duration) and
  audits failures; in a VM task of a host incident (`flow.trail` set) the successful steps are collected and
  written with the VM's one `vm` entry (its record and its steps), one Redis write per VM instead of one per step;
- the oned gateway reports every call to `Hooks.oned_call` / `oned_retry` (it is its `CallObserver`);
- the outcome helpers `Hooks.fence` and `Hooks.recovery` are called from the one place each outcome is decided;
- any other event a flow reports with `flow.emit(event, **fields)` (dry run, outcome unknown, paused, redispatch,
  records lost) becomes its audit entry in `Hooks.event`, the one writer (tests/test_structure.py checks that);
- Celery signals (`bootstrap`) count task retries (`TASK_RETRIES`) and start the metrics endpoint in the worker.

Metric names are part of the interface (dashboards, alerts): keep them exactly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import Counter, Histogram

from oneha.opennebula import ErrorKind
from oneha.workers.oned import describe

if TYPE_CHECKING:  # runtime builds its Hooks: at run time the flow is only passed in
    from oneha.workers.runtime import Flow

log = logging.getLogger("oneha.audit")
F = TypeVar("F", bound=Callable[..., Any])

RECOVERIES = Counter("oneha_recoveries_total", "VM recoveries by incident kind, action and result",
                     ["kind", "action", "result"])
TIME_TO_RECOVER = Histogram("oneha_time_to_recover_seconds", "From incident opened to VM recovered (confirmed)",
                            ["kind"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
TASK_RETRIES = Counter("oneha_task_retries_total", "Celery task retries", ["task"])
ONED_CALL_SECONDS = Histogram("oneha_oned_call_seconds", "oned XML-RPC call latency", ["method"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ONED_ERRORS = Counter("oneha_oned_errors_total", "oned call failures by kind", ["method", "kind"])
FENCE = Counter("oneha_fence_total", "Fence outcomes", ["result"])
PLACEMENTS = Counter("oneha_placements_total", "PENDING VMs of failed hosts by who placed them (oneha, or left to "
                     "oned's scheduler)", ["by"])


class Hooks:
    """Observer of everything the workers do; one instance per process (see workers.runtime)."""

    # oned gateway (CallObserver) ---------------------------------------------------------------------------------
    def oned_call(self, method: str, seconds: float, error: ErrorKind | None) -> None:
        ONED_CALL_SECONDS.labels(method).observe(seconds)
        if error is not None:
            ONED_ERRORS.labels(method, error.value).inc()

    def oned_retry(self, method: str) -> None:
        pass  # counted per call in oned_errors_total{kind="transient"}; task retries are counted separately

    # outcomes ---------------------------------------------------------------------------------------------------
    def fence(self, flow: Flow, result: str, **fields: Any) -> None:
        FENCE.labels(result).inc()
        flow.rt.store.audit(flow.incident.id, "fence", result=result, **fields)
        if result != "fenced" and result != "skipped":
            log.error("ALERT incident %s: fencing host %s %s", flow.incident.id, flow.incident.resource_id, result)

    def recovery(self, flow: Flow, vm_id: int, action: str, result: str, record: dict[str, Any],
                 pipe: Any = None) -> None:
        """Count a VM outcome and audit it (queued on `pipe`, a Redis pipeline, when given)."""
        RECOVERIES.labels(flow.incident.kind.value, action, result).inc()
        if result == "recovered":
            TIME_TO_RECOVER.labels(flow.incident.kind.value).observe(max(0.0, time.time() - flow.incident.opened_at))
        fields: dict[str, Any] = {"vm": vm_id, "action": action, "result": result, "attempts": record.get("attempts")}
        if flow.trail is not None:
            fields["record"] = record
            fields["steps"] = flow.trail
        if pipe is None:
            flow.rt.store.audit(flow.incident.id, "vm", **fields)
        else:
            flow.rt.store.audit_on(pipe, flow.incident.id, "vm", **fields)
        if result not in ("recovered", "skipped", "dry_run"):
            log.warning("incident %s: VM %s %s (%s)", flow.incident.id, vm_id, result, record.get("detail", ""))

    def placement(self, flow: Flow, vm_id: int, by: str, host: int | None, reason: str) -> None:
        """A recreated VM placed by oneha (its record and steps say where), or left to oned's scheduler: audited
        with the reason (no room, constraints oneha does not evaluate, the scheduler was first)."""
        PLACEMENTS.labels(by).inc()
        if by != "oneha":
            flow.rt.store.audit(flow.incident.id, "placement", vm=vm_id, by=by, host=host, reason=reason)

    def event(self, flow: Flow, event: str, **fields: Any) -> None:
        """An event a flow reports (`Flow.emit`): one audit entry, as the flow gave it."""
        flow.rt.store.audit(flow.incident.id, event, **fields)

    def alert(self, flow: Flow, message: str) -> None:
        log.error("ALERT incident %s (%s %s): %s", flow.incident.id, flow.incident.kind.value,
                  flow.incident.resource_id, message)
        flow.rt.store.audit(flow.incident.id, "alert", message=message)


def step(name: str) -> Callable[[F], F]:
    """Wrap a flow step `fn(flow, ...)`: audit its result and duration, or its failure."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(flow: Flow, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            extra = {"vm": args[0]} if args and isinstance(args[0], int) else {}
            try:
                result = fn(flow, *args, **kwargs)
            except Exception as exc:
                flow.rt.store.audit(flow.incident.id, "step", step=name, error=describe(exc),
                                    ms=round((time.monotonic() - started) * 1000), **extra)
                raise
            ms = round((time.monotonic() - started) * 1000)
            if flow.trail is not None:  # a VM task of a host incident: goes into its one `vm` entry
                flow.trail.append([name, _summary(result), ms])
            else:
                flow.rt.store.audit(flow.incident.id, "step", step=name, result=_summary(result), ms=ms, **extra)
            return result

        return cast(F, wrapper)

    return deco


def _summary(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return value.value
    summary = getattr(value, "summary", None)
    if callable(summary):
        return summary()
    if isinstance(value, list | tuple):
        return f"{len(value)} items"
    return type(value).__name__


