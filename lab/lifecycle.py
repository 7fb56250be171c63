"""VM lifecycle in the lab: the transition plans oned's LCM walks a VM through, and the handlers that build them.

A plan is a list of (state, lcm) steps queued on the VM (`CloudState._start_plan`); `advance` enters the next one when
it is due, or lands the VM in the stage's failure state when its host is unreachable or a sticky failure targets it.
The XML-RPC actions follow oned's state rules (`src/rm/RequestManagerVirtualMachine.cc`,
`src/lcm/LifeCycleActions.cc`, `src/lcm/LifeCycleStates.cc`); `recover` is modelled below `RECOVER`'s comment.
"""

from __future__ import annotations

from collections.abc import Callable

from oneha.lab.model import (
    ACT_LIVE_MIGRATE,
    ACT_NONE,
    ACTION_NUMBERS,
    BOOT_FALLBACK,
    FAILURE_OF_STAGE,
    POWER_ON,
    RETRY_STAGE,
    STAGE_OF_FAILURE,
    Host,
    L,
    Step,
    Vm,
)
from oneha.lab.state import CloudState
from oneha.opennebula import RecoverOp, VmState

REVERT_MIGRATE = "REVERT_MIGRATE"  # `step_failure`: a failed SAVE_MIGRATE, back RUNNING on the old host


# ------------------------------------------------------------------------------------------------------------
# Playing a plan (the due steps are advanced by `Cloud.tick`)
def advance(c: CloudState, vm: Vm, now: float) -> None:
    """Enter the VM's next planned step (its time has come), or its stage's failure state."""

    step = vm.plan.pop(0)
    failure = step_failure(c, vm)
    if failure is not None:
        vm.plan.clear()
        c.busy.discard(vm.id)
        if failure == REVERT_MIGRATE:
            back = c.hosts[vm.history[-2].hid]
            c._open_history(vm, back, vm.history[-1].action)  # the previous record, cloned
            c._set(vm, VmState.ACTIVE, L("RUNNING"))
        elif failure in ("POWEROFF", "SUSPENDED"):
            c._set(vm, VmState[failure], L("LCM_INIT"))
        else:
            c._set(vm, VmState.ACTIVE, L(failure))
        return
    on_enter(c, vm, step)
    c._set(vm, step.state, step.lcm)
    vm.next_at = now + c._step_s(vm, now)
    if not vm.plan:
        c.busy.discard(vm.id)


def step_failure(c: CloudState, vm: Vm) -> str | None:
    """A step out of a driver stage fails if the host is unreachable, or if a sticky failure targets it.

    A deployment onto a dead host (one oned still shows MONITORED, so the scheduler picked it) fails in its first
    stage: the TM prolog runs on the target over SSH (`src/tm_mad/qcow2/clone`, which `shared` links to:
    `ssh_make_path $DST_HOST`, `ssh_exec_and_log "$DST_HOST"`), and its failure is `trigger_prolog_failure`
    (src/lcm/LifeCycleStates.cc): PROLOG_FAILURE, the VM running nowhere."""
    if vm.state != VmState.ACTIVE:
        return None
    stage = vm.lcm.name
    if vm.sticky_fail is not None and STAGE_OF_FAILURE.get(vm.sticky_fail.name) == stage:
        return str(vm.sticky_fail.name)
    if stage == "SAVE_MIGRATE" and len(vm.history) >= 2 and c.hosts[vm.history[-2].hid].power != POWER_ON:
        return REVERT_MIGRATE  # the save ran on the old host, which does not answer (`trigger_save_failure`)
    host = c.hosts.get(vm.hid) if vm.hid is not None else None
    if host is not None and host.power != POWER_ON and stage in FAILURE_OF_STAGE:
        return FAILURE_OF_STAGE[stage]
    if host is not None and host.power != POWER_ON and stage in BOOT_FALLBACK:
        return BOOT_FALLBACK[stage]  # `trigger_deploy_failure` (LifeCycleStates.cc): back where it came from
    return None


def on_enter(c: CloudState, vm: Vm, step: Step) -> None:
    """Truth and bookkeeping side effects of entering a state."""
    name = step.lcm.name if step.state == VmState.ACTIVE else step.state.name
    if name == "RUNNING":
        c._really_start(vm)
    elif step.state == VmState.PENDING:
        c._close_history(vm, ACTION_NUMBERS["recover-recreate"])
        c.pending.add(vm.id)
    elif step.state in (VmState.DONE, VmState.STOPPED, VmState.UNDEPLOYED):
        c._close_history(vm, vm.history[-1].action if vm.history else ACT_NONE)


def migrate_to(c: CloudState, vm: Vm, host: Host, live: bool, action: int) -> None:
    """Move a VM (RUNNING, UNKNOWN, POWEROFF or SUSPENDED) to `host` with a new history record."""
    src = c.hosts[vm.hid] if vm.hid is not None else None
    shared = src is not None and c.datastores[c.cluster_ds[src.cluster_id]].shared
    from_lcm = vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name
    if from_lcm == "RUNNING" and live:
        c._set(vm, VmState.ACTIVE, L("MIGRATE"))
        c._really_stop(vm)
        c._open_history(vm, host, ACT_LIVE_MIGRATE)
        c._start_plan(vm, [(VmState.ACTIVE, "RUNNING")], first_now=False)
        return
    if from_lcm == "RUNNING":
        c._really_stop(vm)  # cold migration: the domain is saved and stopped first (where the host can be reached)
        c._open_history(vm, host, action)
        # `trigger_migrate` (LifeCycleActions.cc): SAVE_MIGRATE, the VMM save runs on the *old* host; on a dead one
        # it fails and `revert_migrate_after_failure` (LifeCycleStates.cc) puts the VM back RUNNING there
        # (`step_failure`).
        c._start_plan(vm, [(VmState.ACTIVE, "SAVE_MIGRATE"), (VmState.ACTIVE, "PROLOG_MIGRATE"),
                           (VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")])
    elif from_lcm == "UNKNOWN":
        # The source does not answer: its domain (if any) is left where it is. Disks on a local (ssh) datastore
        # cannot be copied off a dead host, so the prolog fails there (why host_error.rb skips -m on them).
        c._open_history(vm, host, action)
        steps = [(VmState.ACTIVE, "PROLOG_MIGRATE_UNKNOWN")]
        steps += [(VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")] if shared else \
            [(VmState.ACTIVE, "PROLOG_MIGRATE_UNKNOWN_FAILURE")]
        c._start_plan(vm, steps)
    elif from_lcm in ("POWEROFF", "SUSPENDED"):
        stage = "PROLOG_MIGRATE_POWEROFF" if from_lcm == "POWEROFF" else "PROLOG_MIGRATE_SUSPEND"
        c._open_history(vm, host, action)
        c._start_plan(vm, [(VmState.ACTIVE, stage), (VmState[from_lcm], "LCM_INIT")])


# ------------------------------------------------------------------------------------------------------------
# Action handlers: return False when the action is not allowed in the VM's state (→ ACTION error).
def _is(vm: Vm, *names: str) -> bool:

    if vm.plan:
        return False  # a transition is in progress: oned refuses actions in transient states
    current = vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name
    return current in names


def _terminate(c: CloudState, vm: Vm, hard: bool) -> bool:
    if _is(vm, "RUNNING", "UNKNOWN") or (vm.lcm.name.endswith("_FAILURE") and vm.state == VmState.ACTIVE):
        c._really_stop(vm)
        first = "SHUTDOWN" if vm.lcm == L("RUNNING") and not hard else "EPILOG"
        steps: list[tuple[VmState, str]] = [(VmState.ACTIVE, first)]
        if first == "SHUTDOWN":
            steps.append((VmState.ACTIVE, "EPILOG"))
        c._close_history_action(vm, "terminate-hard" if hard else "terminate")
        c._start_plan(vm, [*steps, (VmState.DONE, "LCM_INIT")])
        return True
    if _is(vm, "POWEROFF", "SUSPENDED", "STOPPED", "UNDEPLOYED", "PENDING", "HOLD"):
        c.pending.discard(vm.id)
        c._really_stop(vm)
        c._start_plan(vm, [(VmState.DONE, "LCM_INIT")])
        c._close_history(vm, ACTION_NUMBERS["terminate"])
        return True
    return False


def _poweroff(c: CloudState, vm: Vm, hard: bool) -> bool:
    if not (_is(vm, "RUNNING") or (hard and _is(vm, "UNKNOWN"))):
        return False
    c._really_stop(vm)
    c._close_history_action(vm, "poweroff-hard" if hard else "poweroff")
    c._start_plan(vm, [(VmState.ACTIVE, "SHUTDOWN_POWEROFF"), (VmState.POWEROFF, "LCM_INIT")])
    return True


def _suspend(c: CloudState, vm: Vm) -> bool:
    if not _is(vm, "RUNNING"):
        return False
    c._really_stop(vm)
    c._start_plan(vm, [(VmState.ACTIVE, "SAVE_SUSPEND"), (VmState.SUSPENDED, "LCM_INIT")])
    return True


def _stop(c: CloudState, vm: Vm) -> bool:
    if _is(vm, "RUNNING"):
        c._really_stop(vm)
        c._start_plan(vm, [(VmState.ACTIVE, "SAVE_STOP"), (VmState.ACTIVE, "EPILOG_STOP"),
                           (VmState.STOPPED, "LCM_INIT")])
        return True
    if _is(vm, "SUSPENDED"):
        c._start_plan(vm, [(VmState.ACTIVE, "EPILOG_STOP"), (VmState.STOPPED, "LCM_INIT")])
        return True
    return False


def _undeploy(c: CloudState, vm: Vm, hard: bool) -> bool:
    if _is(vm, "RUNNING"):
        c._really_stop(vm)
        c._start_plan(vm, [(VmState.ACTIVE, "SHUTDOWN_UNDEPLOY"), (VmState.ACTIVE, "EPILOG_UNDEPLOY"),
                           (VmState.UNDEPLOYED, "LCM_INIT")])
        return True
    if _is(vm, "POWEROFF"):
        c._start_plan(vm, [(VmState.ACTIVE, "EPILOG_UNDEPLOY"), (VmState.UNDEPLOYED, "LCM_INIT")])
        return True
    return False


def _hold(c: CloudState, vm: Vm) -> bool:
    if not _is(vm, "PENDING"):
        return False
    c.pending.discard(vm.id)
    c._set(vm, VmState.HOLD, L("LCM_INIT"))
    return True


def _release(c: CloudState, vm: Vm) -> bool:
    if not _is(vm, "HOLD"):
        return False
    c._set(vm, VmState.PENDING, L("LCM_INIT"))
    c.pending.add(vm.id)
    return True


def _resume(c: CloudState, vm: Vm) -> bool:
    boot = {"SUSPENDED": "BOOT_SUSPENDED", "POWEROFF": "BOOT_POWEROFF", "UNKNOWN": "BOOT_UNKNOWN"}
    for name, stage in boot.items():
        if _is(vm, name):
            if name in ("POWEROFF", "UNKNOWN") and c._lcm_ignored():
                return True  # `trigger_restart` found a wrong state: logged only
            if name == "POWEROFF" and vm.hid is not None:
                # `trigger_restart` (LifeCycleActions.cc): the record is closed and copied; the copy says RESUME
                c._open_history(vm, c.hosts[vm.hid], vm.history[-1].action)
                vm.history[-1].action = ACTION_NUMBERS["resume"]
            c._start_plan(vm, [(VmState.ACTIVE, stage), (VmState.ACTIVE, "RUNNING")])
            return True
    if _is(vm, "STOPPED", "UNDEPLOYED"):
        c._set(vm, VmState.PENDING, L("LCM_INIT"))  # redeployed by the scheduler
        c.pending.add(vm.id)
        return True
    return False


def _reboot(c: CloudState, vm: Vm) -> bool:
    return _is(vm, "RUNNING")


def _resched(c: CloudState, vm: Vm, on: bool) -> bool:
    if not _is(vm, "RUNNING", "UNKNOWN", "POWEROFF"):
        return False
    if vm.resched != on:
        vm.resched = on
        c._touch_vm(vm)
    (c.pending.add if on else c.pending.discard)(vm.id)
    return True


ACTIONS: dict[str, Callable[[CloudState, Vm], bool]] = {
    "terminate": lambda c, v: _terminate(c, v, False), "terminate-hard": lambda c, v: _terminate(c, v, True),
    "poweroff": lambda c, v: _poweroff(c, v, False), "poweroff-hard": lambda c, v: _poweroff(c, v, True),
    "undeploy": lambda c, v: _undeploy(c, v, False), "undeploy-hard": lambda c, v: _undeploy(c, v, True),
    "suspend": _suspend, "stop": _stop, "hold": _hold, "release": _release, "resume": _resume,
    "reboot": _reboot, "reboot-hard": _reboot,
    "resched": lambda c, v: _resched(c, v, True), "unresched": lambda c, v: _resched(c, v, False),
}


# ------------------------------------------------------------------------------------------------------------
# recover: `VirtualMachineAPI::recover` (src/rm/api/VirtualMachineAPI.cc) -> `DispatchManager::recover / retry /
# delete_vm / delete_recreate / delete_vm_db` (src/dm/DispatchManagerActions.cc) -> `LifeCycleManager::recover /
# retry / trigger_delete_recreate` (src/lcm/LifeCycleActions.cc). Ops: 0 failure, 1 success, 2 retry, 3 delete,
# 4 delete-recreate, 5 delete-db. Each handler returns oned's error message when the DM refuses, else None: the DM
# accepts, and the LCM acts or, in a state it does not handle, only logs it (the call still succeeded).
def _recover_lcm(c: CloudState, vm: Vm, success: bool) -> str | None:

    if vm.state != VmState.ACTIVE:
        return f"Could not perform a recover operation on VM {vm.id}, wrong state {vm.state.name}."
    if c._lcm_ignored():
        return None
    name = vm.lcm.name
    if name == "UNKNOWN" and not vm.plan:
        c._set(vm, VmState.ACTIVE, L("RUNNING"))  # ops 0 and 1 alike; the operator says it runs: truth unchanged
    elif name in FAILURE_OF_STAGE and vm.plan:  # a driver stage in progress: its success or failure now
        vm.plan.clear()
        c.busy.discard(vm.id)
        if success:
            _stage_success(c, vm, name)
        else:
            c._set(vm, VmState.ACTIVE, L(FAILURE_OF_STAGE[name]))
    elif name in RETRY_STAGE and success:  # a failure state: `trigger_<stage>_success`
        _stage_success(c, vm, RETRY_STAGE[name])
    elif name.startswith("PROLOG_MIGRATE") and name.endswith("_FAILURE") and len(vm.history) >= 2:
        # `trigger_prolog_failure` on a failed migration: back to the previous host, in a new history record
        # cloned from the previous one, then `trigger_prolog_success` from there
        back = c.hosts[vm.history[-2].hid]
        c._open_history(vm, back, vm.history[-1].action)
        _stage_success(c, vm, RETRY_STAGE[name])
    # else (RUNNING, LCM_INIT, a failure state with op 0, ...): nothing changes, and the call succeeded
    return None


def _stage_success(c: CloudState, vm: Vm, stage: str) -> None:
    """Where `trigger_prolog_success` / `_boot_success` / `_epilog_success` (LifeCycleStates.cc) take a VM."""
    if stage in ("PROLOG_MIGRATE_POWEROFF", "PROLOG_MIGRATE_SUSPEND"):
        c._set(vm, VmState.POWEROFF if stage.endswith("POWEROFF") else VmState.SUSPENDED, L("LCM_INIT"))
    elif stage.startswith("PROLOG"):
        c._start_plan(vm, [(VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")])
    elif stage.startswith("EPILOG"):
        end = {"EPILOG": VmState.DONE, "EPILOG_STOP": VmState.STOPPED, "EPILOG_UNDEPLOY": VmState.UNDEPLOYED}
        c._close_history(vm, vm.history[-1].action if vm.history else ACT_NONE)
        c._set(vm, end[stage], L("LCM_INIT"))
    else:  # BOOT*: the operator says it booted; the truth is not changed
        c._set(vm, VmState.ACTIVE, L("RUNNING"))


def _recover_retry(c: CloudState, vm: Vm) -> str | None:
    if vm.state != VmState.ACTIVE:
        return f"Could not perform a retry on VM {vm.id}, wrong state {vm.state.name}."
    if vm.lcm.name not in RETRY_STAGE or c._lcm_ignored():
        return None  # `LifeCycleManager::retry` logs "wrong state" and does nothing
    stage = RETRY_STAGE[vm.lcm.name]
    rest: list[tuple[VmState, str]]
    if stage.startswith("PROLOG_MIGRATE_") and stage != "PROLOG_MIGRATE_UNKNOWN":
        rest = [(VmState.POWEROFF if "POWEROFF" in stage else VmState.SUSPENDED, "LCM_INIT")]
    elif stage.startswith("PROLOG"):
        rest = [(VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")]
    elif stage.startswith("BOOT"):
        rest = [(VmState.ACTIVE, "RUNNING")]
    else:
        rest = [(VmState.DONE, "LCM_INIT")]
    c._start_plan(vm, [(VmState.ACTIVE, stage), *rest])
    return None


def _recover_delete(c: CloudState, vm: Vm) -> str | None:
    if vm.state == VmState.DONE:
        return None  # `delete_vm`: nothing to do, success
    if vm.state in (VmState.INIT, VmState.PENDING, VmState.HOLD):
        c.pending.discard(vm.id)
        c._close_history(vm, ACTION_NUMBERS["recover-delete"])
        c._set(vm, VmState.DONE, L("LCM_INIT"))  # `free_vm_resources`: no driver involved
        return None
    if vm.state == VmState.ACTIVE and c._lcm_ignored():
        return None
    _clean_up(c, vm, "recover-delete", [(VmState.ACTIVE, "CLEANUP_DELETE"), (VmState.DONE, "LCM_INIT")])
    return None


def _recover_recreate(c: CloudState, vm: Vm) -> str | None:
    if vm.state == VmState.DONE:
        return "Cannot delete-recreate a VM already in DONE state"
    if vm.state in (VmState.INIT, VmState.PENDING):
        return None  # `delete_recreate`: already waiting for a host, success
    if vm.state in (VmState.HOLD, VmState.STOPPED, VmState.UNDEPLOYED):
        if vm.history:
            vm.history[-1].action = ACTION_NUMBERS["recover-recreate"]
        c._set(vm, VmState.PENDING, L("LCM_INIT"))
        c.pending.add(vm.id)
        return None
    if vm.state == VmState.ACTIVE and vm.lcm.name in ("CLEANUP_DELETE", "CLEANUP_RESUBMIT"):
        return None  # logged as a wrong state / already resubmitting
    if c._lcm_ignored():
        return None
    _clean_up(c, vm, "recover-recreate", [(VmState.ACTIVE, "CLEANUP_RESUBMIT"), (VmState.PENDING, "LCM_INIT")])
    return None


def _clean_up(c: CloudState, vm: Vm, action: str, steps: list[tuple[VmState, str]]) -> None:
    vm.plan.clear()
    c.busy.discard(vm.id)
    c.pending.discard(vm.id)
    vm.resched = False
    c._really_stop(vm)  # the cleanup kills the domain only where the front-end can reach the host
    c._close_history_action(vm, action)
    c._start_plan(vm, steps)


def _recover_delete_db(c: CloudState, vm: Vm) -> str | None:
    if vm.state == VmState.DONE:
        return None
    vm.plan.clear()
    c.busy.discard(vm.id)
    c.pending.discard(vm.id)
    c._close_history(vm, ACTION_NUMBERS["recover-delete"])
    c._set(vm, VmState.DONE, L("LCM_INIT"))  # nothing is cleaned up: a running domain stays (truth untouched)
    return None


RECOVER: dict[RecoverOp, Callable[[CloudState, Vm], str | None]] = {
    RecoverOp.FAILURE: lambda c, v: _recover_lcm(c, v, False), RecoverOp.SUCCESS: lambda c, v: _recover_lcm(c, v, True),
    RecoverOp.RETRY: _recover_retry, RecoverOp.DELETE: _recover_delete, RecoverOp.DELETE_RECREATE: _recover_recreate,
    RecoverOp.DELETE_DB: _recover_delete_db,
}
