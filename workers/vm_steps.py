"""Steps on one VM, shared by the host flow's VM tasks and the VM failure / crash flows.

Every mutating step re-reads the VM first (through the process's batched `VmReader`), decides from what it sees,
checks the lease token right before the oned call, and does nothing if the VM already left the host or is already
in recovery. So a step run twice (redelivery, a worker that died after acting) converges instead of acting twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import redis

from oneha.opennebula import (
    FAILURE_LCM_STATES,
    VM_IN_FLIGHT_LCM_STATES,
    ErrorKind,
    LcmState,
    RecoverOp,
    VmState,
    VmView,
)
from oneha.settings import ClusterPolicy
from oneha.waiting import WaitTimeout, wait_until
from oneha.workers.hooks import step
from oneha.workers.lock import Lease
from oneha.workers.oned import OnedError
from oneha.workers.outcomes import Action, CallOutcome
from oneha.workers.runtime import Flow

log = logging.getLogger(__name__)

RECOVERABLE_HOST_STATES = (VmState.ACTIVE,)
OFF_STATES = (VmState.SUSPENDED, VmState.POWEROFF)


# Pure decisions ---------------------------------------------------------------------------------------------------
def select_vms(vms: Iterable[VmView], host_id: int, include_suspended: bool) -> tuple[list[VmView], list[VmView]]:
    """(to recover in order, opted out): last history on this host, ACTIVE (+ SUSPENDED/POWEROFF), HA != NO.

    A POWEROFF nobody asked for (`VmView.unrequested_poweroff`: crashed before its host died) is meant to run: it is
    recovered whatever `include_suspended` says.

    Order: HA_PRIORITY descending, then VM id (stable, so a re-run dispatches in the same order).
    """
    states = RECOVERABLE_HOST_STATES + (OFF_STATES if include_suspended else ())
    on_host = [v for v in vms if v.hid == host_id and (v.state in states or v.unrequested_poweroff)]
    chosen = sorted((v for v in on_host if not v.ha_opt_out), key=lambda v: (-v.ha_priority, v.id))
    return chosen, [v for v in on_host if v.ha_opt_out]


def has_left_host(vm: VmView, host_id: int, action: Action | None = None) -> bool:
    """The VM is no longer the failed host's problem: PENDING, on its way, or placed on another host.

    For a delete only DONE counts. A VM in a *_FAILURE state has not left (a failed migration, for instance).
    """
    if action == Action.DELETE:  # == : callers may pass the bare string
        return vm.state == VmState.DONE
    if vm.state == VmState.ACTIVE:
        if vm.lcm_state in FAILURE_LCM_STATES:
            return False
        if vm.lcm_state == LcmState.CLEANUP_RESUBMIT:
            return True  # recreate under way: PENDING next
        return vm.hid != host_id and vm.lcm_state != LcmState.UNKNOWN
    if vm.state in OFF_STATES:
        return vm.hid != host_id
    return True  # PENDING, HOLD, STOPPED, UNDEPLOYED, DONE: not on the host any more


def in_transition(vm: VmView) -> bool:
    """oned is moving this VM already (it would refuse an action anyway): wait, do not act."""
    return vm.state == VmState.ACTIVE and vm.lcm_state in VM_IN_FLIGHT_LCM_STATES


def choose_action(vm: VmView, policy: ClusterPolicy, shared_ds: frozenset[int], migrate_failed: bool = False,
                  host_proven: bool = False) -> tuple[Action, str]:
    """(action, why) for a VM of a failed host: migrate | recreate | delete | none | report.

    `host_proven`: the host was proven dead by a detector and set OFFLINE, so its VMs are still RUNNING in oned
    (monitord never probes an OFFLINE host). A migrate (resched) from RUNNING is a cold migration that first saves
    the VM on its host (SAVE_MIGRATE, `LifeCycleActions.cc`): on a dead host it can only fail. Only a migrate from
    UNKNOWN leaves the old host alone, so a RUNNING VM there takes `migrate_fallback` (recreate needs nothing from
    the old host: recover 4's cleanup there may fail and the VM is resubmitted anyway).
    """
    action = Action(policy.host_action)
    if action is not Action.MIGRATE:
        return action, f"policy {action}"
    reason = ""
    if host_proven and vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.RUNNING:
        reason = "RUNNING on a host proven dead (migrate would save it on the dead host)"
        return _migrate_fallback(policy, reason)
    if migrate_failed:
        reason = "migration failed"
    elif vm.ds_id not in shared_ds:
        reason = f"system datastore {vm.ds_id} not shared"
    elif vm.state == VmState.SUSPENDED:
        reason = "resched is not accepted from SUSPENDED"
    if not reason:
        return Action.MIGRATE, "shared system datastore"
    if vm.resched:
        return Action.MIGRATE, "already rescheduled"
    return _migrate_fallback(policy, reason)


def _migrate_fallback(policy: ClusterPolicy, reason: str) -> tuple[Action, str]:
    if policy.migrate_fallback == "recreate":
        return Action.RECREATE, f"fallback: {reason}"
    return Action.REPORT, reason


# Steps -----------------------------------------------------------------------------------------------------------
# KEYS: vm_recovering. ARGV: incident id, ttl ms. Claim or extend our claim; return the holder.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def claim_ttl_s(flow: Flow) -> float:
    w = flow.rt.settings.worker
    return w.confirm_timeout_s + w.lock_ttl_s + w.task_lease_s


@step("claim_vm")
def claim_vm(flow: Flow, vm_id: int, lease: Lease | None = None,
             then: Callable[[redis.client.Pipeline], None] | None = None) -> int:
    """SET NX `vm_recovering`: returns the incident that owns the VM's recovery (ours, or another one).

    With `lease`, the VM's lease is taken in the same round trip (a pipeline, not a transaction): the caller
    holds it when `lease.token` is set, and must release it if the claim went to another incident. `then` queues
    more on the same pipeline (the VM task: "started", after the lease, so whoever sees it started without a lease
    knows its task ended or died).
    """
    r = flow.rt.redis
    args = (_CLAIM, 1, flow.rt.keys.vm_recovering(vm_id), str(flow.incident.id), int(claim_ttl_s(flow) * 1000))
    if lease is None:
        return int(r.eval(*args))
    pipe = r.pipeline(transaction=False)
    pipe.eval(*args)
    lease.acquire(pipe)
    if then is not None:
        then(pipe)
    holder, taken, *_ = pipe.execute()
    lease.acquired(taken)
    return int(holder)


def release_vm(flow: Flow, vm_id: int, pipe: redis.client.Pipeline | None = None) -> None:
    (pipe or flow.rt.redis).eval(_UNCLAIM, 1, flow.rt.keys.vm_recovering(vm_id), str(flow.incident.id))


def read_vm(flow: Flow, vm_id: int) -> VmView | None:
    return flow.rt.oned.reader.get(vm_id)


def _mutate(flow: Flow, vm: VmView, what: str, call: Callable[[], object]) -> bool:
    """The one mutating call of a step, behind the last gate: lease token, pause, dry-run. False = not made."""
    flow.check_lease()
    flow.rt.check_not_paused()
    if flow.rt.settings.worker.dry_run:
        log.warning("DRY RUN incident %s: would %s VM %s (%s)", flow.incident.id, what, vm.id, vm.state_name)
        flow.emit("dry_run", vm=vm.id, would=what, state=vm.state_name)
        return False
    call()
    return True


@step("recreate_vm")
def recreate_vm(flow: Flow, vm: VmView) -> bool:
    return _mutate(flow, vm, "recover 4 (recreate)", lambda: flow.rt.oned.vm_recover(vm.id, RecoverOp.DELETE_RECREATE))


@step("delete_vm")
def delete_vm(flow: Flow, vm: VmView) -> bool:
    return _mutate(flow, vm, "recover 3 (delete)", lambda: flow.rt.oned.vm_recover(vm.id, RecoverOp.DELETE))


@step("migrate_vm")
def migrate_vm(flow: Flow, vm: VmView) -> bool:
    if vm.resched:
        return True  # already asked: the scheduler will move it
    return _mutate(flow, vm, "resched (migrate)", lambda: flow.rt.oned.vm_action("resched", vm.id))


@step("resume_vm")
def resume_vm(flow: Flow, vm: VmView) -> bool:
    return _mutate(flow, vm, "resume", lambda: flow.rt.oned.vm_action("resume", vm.id))


@step("deploy_vm")
def deploy_vm(flow: Flow, vm: VmView, host_id: int) -> CallOutcome:
    """`one.vm.deploy(vm, host, enforce=True, ds=-1)`: oned checks the host's CPU and memory (not a reservation).

    Its refusal (ACTION: the scheduler placed the VM first, or the room went) is an outcome, not a failure."""
    return run_call(flow, vm, "deploy", lambda: _mutate(
        flow, vm, f"deploy on host {host_id}", lambda: flow.rt.oned.vm_deploy(vm.id, host_id, enforce=True, ds_id=-1)))


ACTIONS = {Action.RECREATE: recreate_vm, Action.DELETE: delete_vm, Action.MIGRATE: migrate_vm,
           Action.RESUME: resume_vm}


def act(flow: Flow, vm: VmView, action: Action) -> CallOutcome:
    """Run one mutating step: 'done', 'dry_run', 'wrong_state' (re-read and decide again), 'gone', or 'unknown'.

    'unknown': oned did not answer; it may have applied the call or may still do so. Nothing is sent again here:
    we wait until the call has ended (answered late, or its connection closed) and the caller re-reads the VM and
    decides again from what oned shows then, exactly as after a worker died right after acting.
    """
    return run_call(flow, vm, action, lambda: ACTIONS[action](flow, vm))


def run_call(flow: Flow, vm: VmView, what: str, step_fn: Callable[[], bool]) -> CallOutcome:
    """`act` for any mutating step `step_fn` (True: made, False: dry run), e.g. a deploy onto a chosen host."""
    try:
        return CallOutcome.DONE if step_fn() else CallOutcome.DRY_RUN
    except OnedError as exc:
        if exc.kind is ErrorKind.UNKNOWN:
            log.warning("incident %s: %s on VM %s: outcome unknown (%s); re-reading before deciding again",
                        flow.incident.id, what, vm.id, exc)
            flow.emit("outcome_unknown", vm=vm.id, action=what)
            ended = flow.rt.oned.settle(vm.id)
            if not ended or flow.rt.oned.abandoned(vm.id):
                # Never answered: oned may apply it whenever it gets to it. Deciding again from a read that shows
                # the VM unchanged could send a second change that lands after the first: hold, and alert.
                flow.rt.hooks.alert(flow, f"VM {vm.id}: {what} never answered by oned (connection closed after "
                                          "oned.abandon_after_s); oned may still apply it: not sent again")
                return CallOutcome.ABANDONED
            return CallOutcome.UNKNOWN
        if exc.kind is ErrorKind.WRONG_STATE:
            return CallOutcome.WRONG_STATE
        if exc.missing:
            return CallOutcome.GONE
        raise


def unchanged(vm: VmView, before: VmView) -> bool:
    """Nothing an accepted call would change has changed."""
    return (vm.state, vm.lcm_state, vm.history_seq, vm.resched) == \
        (before.state, before.lcm_state, before.history_seq, before.resched)


def confirm(flow: Flow, vm_id: int, done: object, timeout_s: float, before: VmView | None = None
            ) -> VmView | None:
    """Poll (batched reads) until `done(vm)` says True or False; None at the deadline. Keeps the lease alive.

    `before`: the VM as it was when an accepted mutating call was sent. A read `accepted_noop_s` later that still
    shows it `unchanged` ends the wait early and returns that VM (the caller's own check then says "not done"), so
    the flow decides again instead of waiting out the deadline: oned accepted the call and did nothing with it."""
    noop_at = time.monotonic() + flow.rt.settings.worker.accepted_noop_s

    def look() -> tuple[VmView | None, bool] | None:
        flow.check_lease_local()  # a read: the local lease check suffices; acting asks Redis (`_mutate`)
        vm = read_vm(flow, vm_id)
        if vm is None:
            return (None, True)
        verdict = done(vm) if callable(done) else None
        if verdict is None and before is not None and time.monotonic() >= noop_at and unchanged(vm, before):
            log.warning("oned accepted a call on VM %d and changed nothing: deciding again", vm_id)
            return (vm, True)
        return (vm, True) if verdict is not None else None

    try:  # the first look is immediate (oned often shows the VM on its way at once: CLEANUP_RESUBMIT)
        found = wait_until(look, timeout_s, interval_s=0.03, backoff=1.5, max_interval_s=0.5,
                           what=f"VM {vm_id} to settle")
    except WaitTimeout:
        return None
    return found[0]


def left_host_verdict(host_id: int, action: Action) -> Callable[[VmView], bool | None]:
    """Settled once the VM left the host (PENDING / on its way / placed elsewhere; DONE for delete), or failed."""

    def verdict(vm: VmView) -> bool | None:
        if has_left_host(vm, host_id, action):
            return True
        if vm.state == VmState.ACTIVE and vm.lcm_state in FAILURE_LCM_STATES:
            return False
        return None

    return verdict


@step("confirm_vm_left_host")
def confirm_vm_left_host(flow: Flow, vm_id: int, host_id: int, action: Action, timeout_s: float,
                         before: VmView | None = None) -> VmView | None:
    """Wait until the VM left the host (PENDING / on its way / placed elsewhere; DONE for delete) or failed."""
    return confirm(flow, vm_id, left_host_verdict(host_id, action), timeout_s, before)
