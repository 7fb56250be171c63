"""VM failure and VM crash flows (TASK_VM_INCIDENT).

- VM failure (an LCM *_FAILURE state): recreate (`recover 4`) or delete (`recover 3`) per policy, with loop
  protection: at most `vm_failure_max_recoveries` recoveries of one VM within `vm_failure_window_s`
  (`keys.vm_recoveries`, one member per incident, so a redelivered task does not count twice); beyond that the VM is
  left alone, the incident FAILED and an alert logged.
- VM crash (ACTIVE/UNKNOWN on a MONITORED host, or POWEROFF that nobody asked for: history ACTION = MONITOR, see
  `oneha.opennebula.MONITOR_ACTION`): `resume`, confirm RUNNING. If the host is not MONITORED or has an open host
  incident, the host incident owns the VM: NO_ACTION. Policy: `vm_crash_action` / `vm_poweroff_action`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from oneha.incidents import Kind, Status
from oneha.opennebula import FAILURE_LCM_STATES, HOST_OPERATOR_STATES, LcmState, VmState, VmView
from oneha.settings import ClusterPolicy
from oneha.workers.hooks import step
from oneha.workers.oned import OnedError
from oneha.workers.outcomes import Action, Result
from oneha.workers.runtime import Flow, Paused, Runtime
from oneha.workers.vm_loop import WAIT, Decision, LoopEnd, LoopState, Verdict, VmLoopKind, call, run_vm_loop, stop
from oneha.workers.vm_steps import claim_vm, release_vm

log = logging.getLogger(__name__)


def handle_vm_incident(rt: Runtime, incident_id: int) -> str:
    inc = rt.store.get(incident_id)
    if inc is None or not inc.status.is_open:
        return "closed"
    if inc.kind is Kind.HOST:
        raise ValueError(f"incident {incident_id} is a host incident")
    lease = rt.lease("vm", inc.resource_id)
    if not lease.acquire():
        return "busy"
    with lease:
        flow = Flow(rt, inc, lease)
        rt.extend(inc.id)
        try:
            rt.check_not_paused()  # before claiming the VM, not only before acting on it
            if inc.kind is Kind.VM_FAILURE:
                return vm_failure_flow(flow)
            return vm_crash_flow(flow)
        except OnedError as exc:
            if not exc.missing:
                raise
            # Deleted from oned: nothing left to do, and raising would re-dispatch it every lease for ever.
            return _close(flow, Status.NO_ACTION, "VM no longer exists", None, Action.NONE, Result.GONE,
                          handled=False)
        except Paused as exc:
            return flow.hold(str(exc))
        finally:
            release_vm(flow, inc.resource_id)


def _close(flow: Flow, status: Status, detail: str, vm: VmView | None, action: Action, result: Result,
           handled: bool = True, attempts: int = 0) -> str:
    rt, inc = flow.rt, flow.incident
    token = inc.extra.get("token") or (str(vm.history_seq) if vm is not None else "")
    record = {"action": action, "result": result, "attempts": attempts, "detail": detail,
              "final_state": vm.state_name if vm is not None else "", "seconds": round(time.time() - inc.opened_at, 3)}
    if action != Action.NONE or result != Result.NO_ACTION:
        rt.store.record_vm(inc.id, inc.resource_id, record)
        rt.hooks.recovery(flow, inc.resource_id, action, result, record)
    rt.store.close(inc, status, detail, handled=handled, handled_token=token if handled else "")
    return result


def is_failed(vm: VmView) -> bool:
    return vm.state == VmState.ACTIVE and vm.lcm_state in FAILURE_LCM_STATES


@step("check_loop_protection")
def check_loop_protection(flow: Flow, vm_id: int) -> int:
    """Recoveries of this VM by other incidents within the window (ours does not count)."""
    w = flow.rt.settings.worker
    key = flow.rt.keys.vm_recoveries(vm_id)
    since = time.time() - w.vm_failure_window_s
    pipe = flow.rt.redis.pipeline(transaction=False)
    pipe.zremrangebyscore(key, "-inf", since)
    pipe.zrangebyscore(key, since, "+inf")
    members = pipe.execute()[1]
    return sum(1 for m in members if m != str(flow.incident.id))


def _loop_stop(flow: Flow, vm: VmView, what: str) -> str | None:
    """Loop protection: the closed incident's result when this VM was recovered too often within the window."""
    w = flow.rt.settings.worker
    done_before = check_loop_protection(flow, vm.id)
    if done_before < w.vm_failure_max_recoveries:
        return None
    flow.rt.hooks.alert(flow, f"VM {vm.id} {what} after {done_before} recoveries within "
                              f"{w.vm_failure_window_s:g}s: left in {vm.state_name}")
    return _close(flow, Status.FAILED, f"loop protection: {done_before} recoveries within the window", vm,
                  Action.NONE, Result.LOOP_PROTECTION)


def _count_recovery(flow: Flow, vm_id: int) -> None:
    w = flow.rt.settings.worker
    key = flow.rt.keys.vm_recoveries(vm_id)
    pipe = flow.rt.redis.pipeline(transaction=False)
    pipe.zadd(key, {str(flow.incident.id): time.time()})
    pipe.expire(key, int(w.vm_failure_window_s) + 60)
    pipe.execute()


def _no_action(flow: Flow, detail: str, vm: VmView, handled: bool = True) -> str:
    return _close(flow, Status.NO_ACTION, detail, vm, Action.NONE, Result.NO_ACTION, handled=handled)


def _claimed(flow: Flow, vm: VmView) -> str | None:
    """Claim the VM for this incident; the task's result when another incident recovers it."""
    owner = claim_vm(flow, vm.id)
    if owner == flow.incident.id:
        return None
    return _no_action(flow, f"in recovery by incident {owner}", vm, handled=False)


class _IncidentVm(VmLoopKind):
    """A VM of a VM incident: read whole with `one.vm.info`; a call that was (or may have been) applied marks the
    incident `acted_at` (a re-run then knows it acted); counted by the loop protection when `counted`."""

    def __init__(self, counted: bool) -> None:
        self.counted = counted

    def read(self, flow: Flow, vm_id: int) -> VmView | None:
        return flow.rt.oned.vm_info(vm_id)

    def before_call(self, flow: Flow, vm: VmView, action: Action) -> None:
        if self.counted:
            _count_recovery(flow, vm.id)

    def after_call(self, flow: Flow) -> None:
        flow.rt.store.set_fields(flow.incident.id, acted_at=round(time.time(), 3))


class _FailedVm(_IncidentVm):
    def __init__(self, first: VmView, action: Action, max_attempts: int) -> None:
        super().__init__(counted=True)
        self.seq, self.action, self.max_attempts = first.history_seq, action, max_attempts

    def decide(self, vm: VmView | None, st: LoopState) -> Decision:
        assert vm is not None  # `one.vm.info` raises for a VM that is gone
        return decide_failed_vm(vm, st, self.action, self.max_attempts)

    def verdict(self, vm: VmView, action: Action) -> Verdict:
        def settled(v: VmView) -> bool | None:
            if action is Action.DELETE:
                return True if v.state == VmState.DONE else None
            return True if (not is_failed(v) or v.history_seq != self.seq) else None

        return settled


def decide_failed_vm(vm: VmView, st: LoopState, action: Action, max_attempts: int) -> Decision:
    """A VM in a *_FAILURE state: `action` until it is not failed any more, at most `max_attempts` times."""
    if st.settled:
        return stop(Result.RECOVERED, action, f"{action}: now {vm.state_name}")
    if not is_failed(vm):
        return stop(Result.RECOVERED, action, f"now {vm.state_name}")
    if st.attempts >= max_attempts:
        return stop(Result.FAILED, action, f"still {vm.state_name} after {st.attempts} attempts")
    return call(action, f"{vm.state_name}")


def _close_loop(flow: Flow, end: LoopEnd, recovered_handled: bool) -> str:
    """Close the incident with the VM loop's result."""
    if end.result is Result.DRY_RUN:
        return _close(flow, Status.NO_ACTION, f"dry run: would {end.action}", end.vm, end.action, end.result,
                      handled=False)
    if end.result is Result.GONE:
        return _close(flow, Status.NO_ACTION, "VM no longer exists", None, end.action, end.result)
    status = Status.RECOVERED if end.result is Result.RECOVERED else Status.FAILED
    handled = recovered_handled or status is not Status.RECOVERED
    return _close(flow, status, end.detail, end.vm, end.action, end.result, handled=handled, attempts=end.attempts)


def vm_failure_flow(flow: Flow) -> str:
    """check the VM is failed -> opt-out / policy -> claim_vm -> loop protection -> the VM loop (recreate | delete)."""
    rt, inc = flow.rt, flow.incident
    policy = rt.settings.policy.for_cluster(inc.cluster_id)
    action = Action(policy.vm_failure_action)
    vm = rt.oned.vm_info(inc.resource_id)
    if not is_failed(vm):
        if inc.extra.get("acted_at"):
            return _close(flow, Status.RECOVERED, f"recovered: now {vm.state_name}", vm, action, Result.RECOVERED)
        return _no_action(flow, f"not in a failure state: {vm.state_name}", vm, handled=False)
    if vm.ha_opt_out:  # whatever opened the incident may have read a short pool body, which does not show HA
        return _no_action(flow, "opted out: HA = NO", vm)
    if action is Action.NONE:
        return _no_action(flow, "vm_failure_action = none", vm)
    stopped = _claimed(flow, vm) or _loop_stop(flow, vm, "failed again")
    if stopped is not None:
        return stopped
    kind = _FailedVm(vm, action, rt.settings.worker.vm_attempts)
    return _close_loop(flow, run_vm_loop(flow, vm.id, kind, LoopState(), vm), recovered_handled=True)


@step("check_crash_owner")
def check_crash_owner(flow: Flow, vm: VmView) -> str | None:
    """Why the host incident owns this VM, or None when the crash is ours to handle."""
    if vm.hid is None:
        return "VM has no host"
    open_host = flow.rt.store.open_incident_id("host", vm.hid)
    if open_host is not None:
        return f"the host incident owns it: host {vm.hid} has open incident {open_host}"
    host = flow.rt.oned.host_info(vm.hid)
    if host.state in HOST_OPERATOR_STATES:
        # oned never declares a DISABLED/OFFLINE host ERROR (REFERENCE §1): nothing confirms it dead, so resuming
        # or recreating could run the VM twice. Say so loudly instead.
        flow.rt.hooks.alert(flow, f"VM {vm.id} is UNKNOWN on host {vm.hid}, which an operator set "
                                  f"{host.state.name}: it cannot be confirmed dead, so oneha leaves the VM; check the "
                                  "host, then enable it or recover the VM by hand")
        return f"host {vm.hid} is {host.state.name}: not confirmed dead, left alone (alerted)"
    if not host.healthy:
        return f"the host incident owns it: host {vm.hid} is {host.state.name}"
    return None


def needs_resume(vm: VmView) -> bool:
    """UNKNOWN (crashed on a healthy host), or POWEROFF without anyone asking (see `MONITOR_ACTION`)."""
    return (vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.UNKNOWN) or vm.unrequested_poweroff


def is_running(vm: VmView) -> bool:
    return vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.RUNNING


def resumed(before: VmView) -> Callable[[VmView], bool | None]:
    """Confirmation of a resume sent to `before`: RUNNING, or False when the boot did not take (UNKNOWN again, or
    POWEROFF in a newer history record: oned opens one per resume from POWEROFF and falls back to POWEROFF when the
    boot fails). POWEROFF in the same record is a resume oned has not started yet: keep waiting."""
    def verdict(v: VmView) -> bool | None:
        if is_running(v):
            return True
        if v.state == VmState.ACTIVE and v.lcm_state == LcmState.UNKNOWN:
            return False
        if v.state == VmState.POWEROFF and v.history_seq != before.history_seq:
            return False
        return None

    return verdict


class _CrashedVm(_IncidentVm):
    confirm_after_refusal = True  # a refused resume: wait for the VM to show where it went before acting again

    def __init__(self, poweroff: bool, max_attempts: int) -> None:
        super().__init__(counted=poweroff)
        self.max_attempts = max_attempts

    def decide(self, vm: VmView | None, st: LoopState) -> Decision:
        assert vm is not None  # `one.vm.info` raises for a VM that is gone
        return decide_crashed_vm(vm, st, self.max_attempts)

    def verdict(self, vm: VmView, action: Action) -> Verdict:
        return resumed(vm)


def decide_crashed_vm(vm: VmView, st: LoopState, max_attempts: int) -> Decision:
    """Resume until RUNNING, at most `max_attempts` times; a VM neither ours to resume nor settling is reported."""
    if is_running(vm):
        return stop(Result.RECOVERED, Action.RESUME, "resumed: RUNNING")
    if st.attempts >= max_attempts or st.waited_out:
        return stop(Result.FAILED, Action.RESUME, f"still {vm.state_name} after {st.attempts} resumes")
    if needs_resume(vm) or (st.attempts > 0 and vm.state == VmState.POWEROFF):
        return call(Action.RESUME, vm.state_name)
    return WAIT  # neither crashed nor running: settling (an operator took over?); wait once, then report


def vm_crash_flow(flow: Flow) -> str:
    """UNKNOWN on a healthy host, or a POWEROFF nobody asked for: resume on the same host, per policy.

    check it crashed -> opt-out -> check_crash_owner -> policy -> claim_vm -> loop protection (POWEROFF only) ->
    the VM loop (resume). The POWEROFF case is counted by the VM loop protection (a guest that keeps powering itself
    off is resumed at most `vm_failure_max_recoveries` times per window, then left off with an alert)."""
    rt, inc = flow.rt, flow.incident
    policy = rt.settings.policy.for_cluster(inc.cluster_id)
    vm = rt.oned.vm_info(inc.resource_id)
    if not needs_resume(vm):
        if inc.extra.get("acted_at") and is_running(vm):
            return _close(flow, Status.RECOVERED, "resumed", vm, Action.RESUME, Result.RECOVERED, handled=False)
        return _no_action(flow, f"not crashed: {vm.state_name}", vm, handled=False)
    if vm.ha_opt_out:
        return _no_action(flow, "opted out: HA = NO", vm)
    refused = check_crash_owner(flow, vm) or _crash_policy_refuses(vm, policy)
    if refused is not None:
        return _no_action(flow, refused, vm)
    poweroff = vm.state == VmState.POWEROFF
    again = "powered off again without anyone asking"
    stopped = _claimed(flow, vm) or (_loop_stop(flow, vm, again) if poweroff else None)
    if stopped is not None:
        return stopped
    kind = _CrashedVm(poweroff, rt.settings.worker.vm_attempts)
    return _close_loop(flow, run_vm_loop(flow, vm.id, kind, LoopState(), vm), recovered_handled=False)


def _crash_policy_refuses(vm: VmView, policy: ClusterPolicy) -> str | None:
    if vm.state == VmState.POWEROFF and policy.vm_poweroff_action == "off":
        return "vm_poweroff_action = off"
    if vm.state != VmState.POWEROFF and policy.vm_crash_action == "none":
        return "vm_crash_action = none"
    return None
