"""The VM task of a host incident (TASK_RECOVER_VM): one per VM of a failed host, sent in priority order.

    recover_host_vm(incident, vm)
      claim_vm -> run_vm_loop(HostVm: re-read, decide, act, confirm_vm_left_host)* -> record
      -> the task that empties the incident's pending set closes the incident (finish_incident)

Idempotent: the pending set says whether the VM still needs a task, the claim (`vm_recovering`) whether another
incident recovers it, the VM lease whether another copy of this task runs; every call re-reads the VM first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from oneha.celeryconf import TASK_SOFT_TIME_LIMIT_S
from oneha.incidents import Incident, Status
from oneha.opennebula import HostStatus, LcmState, VmState, VmView
from oneha.settings import ClusterPolicy
from oneha.workers.lock import Lease
from oneha.workers.oned import OnedError
from oneha.workers.outcomes import OK_RESULTS, Action, Result
from oneha.workers.placement import place_vm, wants_placement
from oneha.workers.runtime import Flow, Paused, Runtime
from oneha.workers.vm_loop import WAIT, Decision, LoopEnd, LoopState, Verdict, VmLoopKind, call, run_vm_loop, stop
from oneha.workers.vm_steps import (
    choose_action,
    claim_vm,
    confirm,
    confirm_vm_left_host,
    has_left_host,
    in_transition,
    left_host_verdict,
    read_vm,
    release_vm,
)

log = logging.getLogger(__name__)


@dataclass
class VmOutcome:
    action: str
    result: str  # a Result
    attempts: int
    detail: str
    started_at: float
    acted_at: float | None
    confirmed_at: float | None
    final_state: str = ""
    placement: dict[str, object] = field(default_factory=dict)  # workers/placement.py: who placed it, where

    def record(self) -> dict[str, object]:
        return {**self.placement, "action": self.action, "result": self.result, "attempts": self.attempts,
                "detail": self.detail,
                "started_at": round(self.started_at, 3),
                "acted_at": round(self.acted_at, 3) if self.acted_at else None,
                "confirmed_at": round(self.confirmed_at, 3) if self.confirmed_at else None,
                "seconds": round((self.confirmed_at or time.time()) - self.started_at, 3),
                "final_state": self.final_state}


def decide_host_vm(vm: VmView | None, st: LoopState, host_id: int, policy: ClusterPolicy, max_attempts: int,
                   migrate_failed: bool, shared_ds: Callable[[], frozenset[int]], host_proven: bool = False,
                   unknown_until: float = 0.0) -> Decision:
    """The decision for a VM of a failed host, from the VM as read and the loop's state."""
    if vm is None:
        return stop(Result.GONE, st.action, "VM no longer exists")
    if has_left_host(vm, host_id, st.action if st.action is Action.DELETE else None):
        return stop(Result.RECOVERED, st.action if st.attempts else Action.NONE,
                    st.detail or "already left the host")
    if st.attempts >= max_attempts or time.monotonic() >= st.deadline:
        result = Result.FAILED if st.attempts >= max_attempts else Result.TIMEOUT
        return stop(result, st.action, st.detail or f"still {vm.state_name}")
    if in_transition(vm):
        return WAIT
    shared = shared_ds() if policy.host_action == "migrate" else frozenset[int]()
    if host_proven and awaits_unknown(vm, policy, shared, migrate_failed, unknown_until):
        return WAIT
    action, why = choose_action(vm, policy, shared, migrate_failed, host_proven)
    if action is Action.NONE:
        return stop(Result.LEFT_ON_HOST, action, why)
    if action is Action.REPORT:
        return stop(Result.NOT_RECOVERABLE, action, why)
    return call(action, why)


def awaits_unknown(vm: VmView, policy: ClusterPolicy, shared: frozenset[int], migrate_failed: bool,
                   unknown_until: float) -> bool:
    """A RUNNING VM of a proven-dead host set DISABLED for migration (`expose_vms_to_probe`): wait for monitord's
    failed probe to set it UNKNOWN (then it migrates without the old host), until `unknown_until` (epoch)."""
    return (policy.host_action == "migrate" and vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.RUNNING
            and vm.ds_id in shared and not migrate_failed and time.time() < unknown_until)


class HostVm(VmLoopKind):
    """A VM of a failed host: read through the batched reader; settled once it left the host."""

    def __init__(self, flow: Flow, host_id: int, policy: ClusterPolicy) -> None:
        self.flow, self.host_id, self.policy = flow, host_id, policy
        self.migrate_failed = False
        extra = flow.incident.extra
        self.proven = bool(extra.get("proof"))
        disabled_at = float(extra.get("disabled_at") or 0.0)
        self.unknown_until = disabled_at + flow.rt.settings.worker.unknown_wait_s if disabled_at else 0.0
        self.awaiting = False  # the last decision waits for the VM to go UNKNOWN

    def read(self, flow: Flow, vm_id: int) -> VmView | None:
        return read_vm(flow, vm_id)

    def decide(self, vm: VmView | None, st: LoopState) -> Decision:
        if vm is not None and vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.PROLOG_MIGRATE_UNKNOWN_FAILURE:
            self.migrate_failed = True
        decision = decide_host_vm(vm, st, self.host_id, self.policy, self.flow.rt.settings.worker.vm_attempts,
                                  self.migrate_failed, self.flow.rt.oned.shared_system_datastores, self.proven,
                                  self.unknown_until)
        self.awaiting = decision is WAIT and vm is not None and vm.lcm_state == LcmState.RUNNING and self.proven
        return decision

    def verdict(self, vm: VmView, action: Action) -> Verdict:
        if self.awaiting:
            return lambda v: None if (v.state, v.lcm_state) == (VmState.ACTIVE, LcmState.RUNNING) else True
        return left_host_verdict(self.host_id, action)

    def wait(self, flow: Flow, vm_id: int, action: Action, verdict: Verdict, timeout_s: float,
             before: VmView | None) -> VmView | None:
        if self.awaiting:  # until UNKNOWN (or anything else), at most until unknown_until
            return confirm(flow, vm_id, verdict, max(0.1, min(timeout_s, self.unknown_until - time.time())))
        return confirm_vm_left_host(flow, vm_id, self.host_id, action, timeout_s, before)

    def reuse(self, seen: VmView, st: LoopState) -> bool:
        """Only a read that shows the VM gone from the host is taken as it is; anything that acts reads afresh."""
        return has_left_host(seen, self.host_id, st.action if st.action is Action.DELETE else None)


_AT_THE_END = (Result.GONE, Result.RECOVERED)  # results confirmed by the read that ended the loop
_AFTER_ACTING = (*_AT_THE_END, Result.FAILED, Result.TIMEOUT)  # results that keep when we acted


def recover_vm_of_host(flow: Flow, vm_id: int, host_id: int, policy: ClusterPolicy, budget_s: float) -> VmOutcome:
    """Recover one VM of a failed host: re-read, decide, act, confirm; retry up to `vm_attempts`."""
    started = time.time()
    st = LoopState(deadline=time.monotonic() + budget_s)
    end = run_vm_loop(flow, vm_id, HostVm(flow, host_id, policy), st)
    outcome = outcome_of(end, started)
    if end.result is Result.RECOVERED and wants_placement(end.vm, policy):
        try:
            # within the task's time budget (the loop's deadline): what is left of it when the loop ended
            wait_s = min(flow.rt.settings.worker.placement_wait_s, st.deadline - time.monotonic())
            outcome.placement = place_vm(flow, vm_id, host_id, max(0.1, wait_s))
        except OnedError as exc:  # the VM is off the host and PENDING: the scheduler is the backstop
            detail = f"placement failed: {exc}"
            flow.rt.hooks.placement(flow, vm_id, "scheduler", None, detail)
            outcome.placement = {"placement": "scheduler", "placement_detail": detail}
    return outcome


def outcome_of(end: LoopEnd, started: float) -> VmOutcome:
    return VmOutcome(end.action, end.result, end.attempts, end.detail, started,
                     end.acted_at if end.result in _AFTER_ACTING else None,
                     time.time() if end.result in _AT_THE_END else None,
                     end.vm.state_name if end.vm is not None else "")


# Task body -----------------------------------------------------------------------------------------------------------
def recover_host_vm(rt: Runtime, incident_id: int, vm_id: int) -> str:
    inc, pending = rt.store.get_if_vm_pending(incident_id, vm_id)
    if inc is None or not inc.status.is_open:
        return "closed"
    if not pending:
        return "done"
    rt.extend(incident_id)
    flow = Flow(rt, inc, trail=[])
    lease = rt.lease("vm", vm_id)
    # The claim, the VM lease and "started" (a re-run then knows this task is not still queued): one round trip.
    owner = claim_vm(flow, vm_id, lease, lambda pipe: rt.store.mark_vm_started(incident_id, vm_id, pipe))
    if owner != incident_id:
        if lease.token is not None:
            lease.release()
        outcome_record = {"action": Action.NONE, "result": Result.SKIPPED, "attempts": 0,
                          "detail": f"in recovery by incident {owner}"}
        _finish_vm(flow, vm_id, outcome_record)
        return Result.SKIPPED
    if lease.token is None:
        return "busy"
    result = _recover_leased(flow, vm_id, lease)
    pipe = rt.redis.pipeline(transaction=False)
    lease.release(pipe)
    release_vm(flow, vm_id, pipe)
    pipe.execute()
    return result


def _recover_leased(flow: Flow, vm_id: int, lease: Lease) -> str:
    """With the VM claimed and leased: the loop, then its record (the lease released on any failure)."""
    rt, inc = flow.rt, flow.incident
    lease.start_renewal()
    try:
        flow.lease = lease
        policy = rt.settings.policy.for_cluster(inc.cluster_id)
        budget = TASK_SOFT_TIME_LIMIT_S - 30
        outcome = recover_vm_of_host(flow, vm_id, inc.resource_id, policy, budget)
        flow.check_lease_local()
        record = outcome.record()
        pipe = rt.redis.pipeline(transaction=False)
        rt.hooks.recovery(flow, vm_id, outcome.action, outcome.result, record, pipe=pipe)
        _finish_vm(flow, vm_id, record, pipe)
    except Paused:
        lease.release()  # the VM stays pending: the host incident sends it again after `resume`
        flow.emit("paused", vm=vm_id)
        raise
    except BaseException:
        lease.release()  # the claim stays until it expires: a retry of this incident takes it again
        raise
    return outcome.result


def _finish_vm(flow: Flow, vm_id: int, record: dict[str, object], pipe: redis.client.Pipeline | None = None
               ) -> None:
    """Record the VM and take it off the pending set (one round trip, with whatever `pipe` already holds)."""
    rt, inc = flow.rt, flow.incident
    if rt.store.finish_vm(inc.id, vm_id, record, pipe):
        finish_incident(rt, inc.id)
    else:
        rt.extend(inc.id)


def without_record(rt: Runtime, inc: Incident) -> set[int]:
    """VMs the incident chose (its `order`) that have no record."""
    chosen = {int(v) for v in json.loads(inc.extra.get("order", "[]"))}
    return chosen - set(rt.store.vm_records(inc.id)) if chosen else set()


def finish_incident(rt: Runtime, incident_id: int) -> Status | None:
    """Close a host incident once every selected VM has its record: RECOVERED, or PARTIAL with the failures (a VM
    chosen but without a record — lost with Redis — counts as not recovered, never as nothing)."""
    inc = rt.store.get(incident_id)
    if inc is None or not inc.status.is_open:
        return None
    records: dict[int, dict[str, object]] = {v: {"result": Result.NO_RECORD} for v in without_record(rt, inc)}
    records.update(rt.store.vm_records(incident_id))
    bad = {vid: r.get("result") for vid, r in records.items() if r.get("result") not in OK_RESULTS}
    if bad:
        status = Status.PARTIAL
        detail = f"{len(records) - len(bad)}/{len(records)} VMs recovered; not: " + ", ".join(
            f"{v}:{r}" for v, r in sorted(bad.items())[:20])
    elif records and all(r.get("result") == Result.DRY_RUN for r in records.values()):
        status = Status.NO_ACTION  # a drill: nothing was changed, and the record must not say otherwise
        detail = f"dry run: {len(records)} VMs would have been recovered; nothing changed in oned"
    else:
        status = Status.RECOVERED
        detail = f"{len(records)} VMs recovered"
    if rt.store.close(inc, status, detail) and inc.extra.get("disabled_at"):
        _back_offline(rt, inc)
    return status


def _back_offline(rt: Runtime, inc: Incident) -> None:
    """The host flow set a proven-dead host DISABLED for its VMs' migration (`expose_vms_to_probe`): OFFLINE again,
    so that an operator's `onehost enable` gives INIT and a probe, never MONITORED at once with the capacity from
    before the failure (`Host::enable`, src/host/Host.cc). Best effort: a DISABLED host is out of the scheduler too."""
    try:
        rt.oned.host_status(inc.resource_id, HostStatus.OFFLINE)
    except OnedError as exc:
        log.warning("incident %s: host %s left DISABLED, setting it OFFLINE failed: %s", inc.id, inc.resource_id,
                    exc)
