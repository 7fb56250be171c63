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
from oneha.workers.hooks import step
from oneha.workers.oned import OnedError
from oneha.workers.runtime import Flow, Paused, Runtime
from oneha.workers.vm_steps import act, claim_vm, confirm, release_vm

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
            return _close(flow, Status.NO_ACTION, "VM no longer exists", None, "none", "gone", handled=False)
        except Paused as exc:
            rt.store.set_status(inc.id, Status.HELD, str(exc))
            rt.store.schedule(inc.id, time.time() + rt.settings.worker.storm_recheck_s)
            return "held"
        finally:
            release_vm(flow, inc.resource_id)


def _close(flow: Flow, status: Status, detail: str, vm: VmView | None, action: str, result: str,
           handled: bool = True, attempts: int = 0) -> str:
    rt, inc = flow.rt, flow.incident
    token = inc.extra.get("token") or (str(vm.history_seq) if vm is not None else "")
    record = {"action": action, "result": result, "attempts": attempts, "detail": detail,
              "final_state": vm.state_name if vm is not None else "", "seconds": round(time.time() - inc.opened_at, 3)}
    if action != "none" or result not in ("no_action",):
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
                  "none", "loop_protection")


def _count_recovery(flow: Flow, vm_id: int) -> None:
    w = flow.rt.settings.worker
    key = flow.rt.keys.vm_recoveries(vm_id)
    pipe = flow.rt.redis.pipeline(transaction=False)
    pipe.zadd(key, {str(flow.incident.id): time.time()})
    pipe.expire(key, int(w.vm_failure_window_s) + 60)
    pipe.execute()


def vm_failure_flow(flow: Flow) -> str:
    rt, inc = flow.rt, flow.incident
    w = rt.settings.worker
    vid = inc.resource_id
    policy = rt.settings.policy.for_cluster(inc.cluster_id)
    vm = rt.oned.vm_info(vid)
    if not is_failed(vm):
        if inc.extra.get("acted_at"):
            return _close(flow, Status.RECOVERED, f"recovered: now {vm.state_name}", vm,
                          policy.vm_failure_action, "recovered")
        return _close(flow, Status.NO_ACTION, f"not in a failure state: {vm.state_name}", vm, "none", "no_action",
                      handled=False)
    if vm.ha_opt_out:  # whatever opened the incident may have read a short pool body, which does not show HA
        return _close(flow, Status.NO_ACTION, "opted out: HA = NO", vm, "none", "no_action")
    if policy.vm_failure_action == "none":
        return _close(flow, Status.NO_ACTION, "vm_failure_action = none", vm, "none", "no_action")
    owner = claim_vm(flow, vid)
    if owner != inc.id:
        return _close(flow, Status.NO_ACTION, f"in recovery by incident {owner}", vm, "none", "no_action",
                      handled=False)
    stopped = _loop_stop(flow, vm, "failed again")
    if stopped is not None:
        return stopped
    action = policy.vm_failure_action
    seq = vm.history_seq
    attempts = 0
    while attempts < w.vm_attempts:
        if not is_failed(vm):
            break
        attempts += 1
        _count_recovery(flow, vid)
        outcome = act(flow, vm, action)
        if outcome == "dry_run":
            return _close(flow, Status.NO_ACTION, f"dry run: would {action}", vm, action, "dry_run", handled=False)
        if outcome == "gone":
            return _close(flow, Status.NO_ACTION, "VM no longer exists", None, action, "gone")
        if outcome in ("done", "unknown"):  # unknown: it may have been applied; the re-read tells
            rt.store.set_fields(inc.id, acted_at=round(time.time(), 3))

            def settled(v: VmView) -> bool | None:
                if action == "delete":
                    return True if v.state == VmState.DONE else None
                return True if (not is_failed(v) or v.history_seq != seq) else None

            seen = confirm(flow, vid, settled, w.confirm_timeout_s, before=vm)
            if seen is not None and not settled(seen):
                vm = seen  # oned accepted the call and did nothing: decide again
                continue
            if seen is not None or action == "delete":
                final = seen or vm
                if action == "delete" and seen is None:
                    vm = rt.oned.vm_info(vid)
                    continue
                return _close(flow, Status.RECOVERED, f"{action}: now {final.state_name}", final, action,
                              "recovered", attempts=attempts)
        vm = rt.oned.vm_info(vid)
    if not is_failed(vm):
        return _close(flow, Status.RECOVERED, f"now {vm.state_name}", vm, action, "recovered", attempts=attempts)
    return _close(flow, Status.FAILED, f"still {vm.state_name} after {attempts} attempts", vm, action, "failed",
                  attempts=attempts)


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


def vm_crash_flow(flow: Flow) -> str:
    """UNKNOWN on a healthy host, or a POWEROFF nobody asked for: resume on the same host, per policy.

    The second is counted by the VM loop protection (a guest that keeps powering itself off is resumed at most
    `vm_failure_max_recoveries` times per window, then left off with an alert)."""
    rt, inc = flow.rt, flow.incident
    w = rt.settings.worker
    vid = inc.resource_id
    policy = rt.settings.policy.for_cluster(inc.cluster_id)
    vm = rt.oned.vm_info(vid)
    if not needs_resume(vm):
        if inc.extra.get("acted_at") and is_running(vm):
            return _close(flow, Status.RECOVERED, "resumed", vm, "resume", "recovered", handled=False)
        return _close(flow, Status.NO_ACTION, f"not crashed: {vm.state_name}", vm, "none", "no_action",
                      handled=False)
    if vm.ha_opt_out:
        return _close(flow, Status.NO_ACTION, "opted out: HA = NO", vm, "none", "no_action")
    owner_reason = check_crash_owner(flow, vm)
    if owner_reason is not None:
        return _close(flow, Status.NO_ACTION, owner_reason, vm, "none", "no_action")
    poweroff = vm.state == VmState.POWEROFF
    if poweroff and policy.vm_poweroff_action == "off":
        return _close(flow, Status.NO_ACTION, "vm_poweroff_action = off", vm, "none", "no_action")
    if not poweroff and policy.vm_crash_action == "none":
        return _close(flow, Status.NO_ACTION, "vm_crash_action = none", vm, "none", "no_action")
    owner = claim_vm(flow, vid)
    if owner != inc.id:
        return _close(flow, Status.NO_ACTION, f"in recovery by incident {owner}", vm, "none", "no_action",
                      handled=False)
    stopped = _loop_stop(flow, vm, "powered off again without anyone asking") if poweroff else None
    if stopped is not None:
        return stopped
    attempts = 0
    while attempts < w.vm_attempts and not is_running(vm):
        acting = needs_resume(vm) or (attempts > 0 and vm.state == VmState.POWEROFF)
        if acting:
            attempts += 1
            if poweroff:
                _count_recovery(flow, vid)
            outcome = act(flow, vm, "resume")
            if outcome == "dry_run":
                return _close(flow, Status.NO_ACTION, "dry run: would resume", vm, "resume", "dry_run",
                              handled=False)
            if outcome == "gone":
                return _close(flow, Status.NO_ACTION, "VM no longer exists", None, "resume", "gone")
            if outcome in ("done", "unknown"):  # unknown: it may have been applied; the re-read tells
                rt.store.set_fields(inc.id, acted_at=round(time.time(), 3))
        seen = confirm(flow, vid, resumed(vm), w.confirm_timeout_s, before=vm if acting else None)
        vm = seen if seen is not None else rt.oned.vm_info(vid)
        if seen is None and not acting:
            break  # neither ours to resume nor settling (an operator took over?): report, do not spin
    if is_running(vm):
        return _close(flow, Status.RECOVERED, "resumed: RUNNING", vm, "resume", "recovered", handled=False,
                      attempts=attempts)
    return _close(flow, Status.FAILED, f"still {vm.state_name} after {attempts} resumes", vm, "resume", "failed",
                  attempts=attempts)
