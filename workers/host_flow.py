"""The host-failure flow: one incident, small named steps, each re-reading state and safe to repeat.

    recover_host(incident)            TASK_RECOVER_HOST
      lock_host -> confirm_host_failed -> check_storm -> fence_host -> [take_host_offline -> [expose_vms_to_probe]]
      -> list_vms_to_recover -> dispatch_vm_recoveries
    recover_host_vm(incident, vm)     TASK_RECOVER_VM, one per VM, in priority order (workers/vm_task.py)
      claim_vm -> (re-read, decide, act, confirm_vm_left_host)* -> record -> the last one closes the incident

A host proven dead by a detector (the incident's `proof` field, issue 13) may still be MONITORED in oned, and a
MONITORED host is one the scheduler may place a recreated VM on (`src/schedm/SchedulerManagerDriver.cc`: hosts with
state 2): the real oned recreated a VM back onto the dead host. So `take_host_offline` sets it OFFLINE and reads
STATE 8 back before any VM task is sent; not confirmed: held with an alert, no VM touched. Its fence is the
detector's (`fenced_at` is set), so `fence_host` is skipped.

At-least-once delivery: the host lock (lease + fencing token) keeps two copies of the host task from running
together; progress markers on the incident (`fenced_at`, status RECOVERING, the pending set) make a re-run continue
instead of replaying; VM tasks are idempotent (pending set, VM lock, re-read before acting). The incident's due time
is the watchdog: while we work it is pushed a lease ahead; if a worker dies it comes due and the dispatcher sends the
host task again, which re-sends the VM tasks that were lost (`redispatch_pending`).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from oneha.incidents import Kind, Status
from oneha.keys import TASK_RECOVER_VM, VM_QUEUE
from oneha.opennebula import ErrorKind, HostState, HostStatus, HostView, VmView
from oneha.settings import ClusterPolicy
from oneha.waiting import WaitTimeout, wait_until
from oneha.workers.fence import FenceResult, run_fence
from oneha.workers.hooks import step
from oneha.workers.oned import OnedError
from oneha.workers.runtime import Flow, Runtime
from oneha.workers.vm_steps import select_vms
from oneha.workers.vm_task import finish_incident, without_record

log = logging.getLogger(__name__)

# Reads a host flow starts ahead of time (the VMs of the host while it is being fenced). Each goes through the
# oned gateway, so the pool-wide cap still bounds them.
_READS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="oneha-prefetch")


def storm_reason(cluster_hosts: list[HostView], recent_failures: int, max_share: float, max_hosts: int
                 ) -> str | None:
    """Why this looks like the front-end being cut off rather than hosts dying; None when it does not.

    The share rule needs at least two failed hosts: one host is never a storm, even in a two-host cluster.
    """
    failed = sum(1 for h in cluster_hosts if h.failed)
    if cluster_hosts and failed >= 2 and failed / len(cluster_hosts) > max_share:
        return f"{failed}/{len(cluster_hosts)} hosts of the cluster in ERROR (> {max_share:.0%})"
    if recent_failures > max_hosts:
        return f"{recent_failures} host failures within the storm window (> {max_hosts})"
    return None


# Steps -------------------------------------------------------------------------------------------------------------
@step("confirm_host_failed")
def confirm_host_failed(flow: Flow) -> tuple[HostView, list[HostView]]:
    """Re-read the host from oned: one `hostpool.info` serves this step and the storm guard's cluster view."""
    pool = flow.rt.oned.host_pool()
    for h in pool:
        if h.id == flow.incident.resource_id:
            return h, pool
    raise OnedError("one.hostpool.info", ErrorKind.PERMANENT,
                    f"host {flow.incident.resource_id} is not in the host pool", missing=True)


@step("check_storm")
def check_storm(flow: Flow, host: HostView, pool: list[HostView] | None = None) -> str | None:
    rt, inc, w = flow.rt, flow.incident, flow.rt.settings.worker
    now = time.time()
    key = rt.keys.host_failures
    pipe = rt.redis.pipeline(transaction=False)
    pipe.zadd(key, {str(inc.id): inc.opened_at})
    pipe.zremrangebyscore(key, "-inf", now - w.storm_window_s)
    pipe.zcount(key, now - w.storm_window_s, "+inf")
    pipe.expire(key, int(w.storm_window_s) + 60)
    recent = int(pipe.execute()[2])
    if inc.approved:
        return None
    cluster = [h for h in (pool if pool is not None else rt.oned.host_pool()) if h.cluster_id == host.cluster_id]
    return storm_reason(cluster, recent, w.storm_max_share, w.storm_max_hosts)


@step("fence_host")
def fence_host(flow: Flow, host: HostView, policy: ClusterPolicy) -> FenceResult:
    if flow.incident.extra.get("fenced_at"):
        return FenceResult("fenced", 0, "already fenced in this incident")

    def before_attempt() -> None:
        flow.check_lease()
        flow.rt.extend(flow.incident.id, policy.fence_timeout_s)

    result = run_fence(policy, host, before_attempt, flow.rt.settings.worker.fence_env)
    flow.rt.hooks.fence(flow, result.result, attempts=result.attempts, detail=result.detail)
    if result.ok:
        flow.rt.store.set_fields(flow.incident.id, fenced_at=round(time.time(), 3), fence=result.result)
    return result


def proven_dead(flow: Flow) -> bool:
    """The incident's host was proven dead by a detector (BMC Off or a stale storage heartbeat), not by oned."""
    return bool(flow.incident.extra.get("proof"))


@step("take_host_offline")
def take_host_offline(flow: Flow, host: HostView) -> bool:
    """`one.host.status(hid, OFFLINE)`, then STATE 8 read back: True once oned shows the host OFFLINE.

    OFFLINE, not DISABLED: the scheduler and `one.vm.deploy`/`migrate` leave it out, monitord stops probing it and
    ignores its reports, so its VMs stay RUNNING and nothing of oned's acts on them behind our back (research
    §1: `HostAPI.cc`, `Host.cc` offline(), `HostMonitorManager.cc`). oned's answer is not trusted alone (the
    handler ignores what `hpool->update` returns), hence the read-back. An unanswered call is never sent again:
    it is read back for `offline_confirm_s` (sending OFFLINE twice would be harmless, but a lingering call is
    not ours to race). Idempotent: a host already OFFLINE costs nothing.
    """
    if host.state == HostState.OFFLINE:
        return True
    return _set_host_status(flow, host, HostStatus.OFFLINE, HostState.OFFLINE)


@step("expose_vms_to_probe")
def expose_vms_to_probe(flow: Flow, host: HostView) -> bool:
    """host_action = migrate: OFFLINE -> DISABLED, so that monitord probes the host at once
    (`HostMonitorManager::update_host`: a host leaving OFFLINE is probed now), the probe fails, and oned sets its
    RUNNING VMs UNKNOWN (`InformationManager.cc`, `LifeCycleStates.cc` monitor_done), from where a migration
    never contacts the old host (PROLOG_MIGRATE_UNKNOWN). DISABLED keeps it out of the scheduler as OFFLINE did;
    it shows no ERROR and publishes no host event (`Host::error` keeps DISABLED). The VM tasks wait for UNKNOWN
    up to `unknown_wait_s` after `disabled_at`; the incident's close sets the host OFFLINE again."""
    if not _set_host_status(flow, host, HostStatus.DISABLED, HostState.DISABLED):
        return False
    if not flow.rt.settings.worker.dry_run:  # a drill changed nothing: no VM will go UNKNOWN, none waits for it
        flow.rt.store.set_fields(flow.incident.id, disabled_at=round(time.time(), 3))
    return True


def _set_host_status(flow: Flow, host: HostView, status: HostStatus, state: HostState) -> bool:
    flow.check_lease()
    flow.rt.check_not_paused()
    if flow.rt.settings.worker.dry_run:
        log.warning("DRY RUN incident %s: would set host %s %s", flow.incident.id, host.id, state.name)
        flow.emit("dry_run", host=host.id, would=f"host status {state.name}", state=host.state.name)
        return True  # the VM steps are dry runs as well: nothing is touched
    wait_s = 0.0
    try:
        flow.rt.oned.host_status(host.id, status)
    except OnedError as exc:
        if exc.kind is ErrorKind.UNKNOWN:
            flow.emit("outcome_unknown", host=host.id, action=state.name)
            wait_s = flow.rt.settings.worker.offline_confirm_s  # it may still be applied: read until then
        else:
            flow.emit("host_status_refused", host=host.id, status=state.name, error=str(exc)[:200])
    return _reads_state(flow, host.id, state, wait_s)


def _reads_state(flow: Flow, host_id: int, state: HostState, wait_s: float) -> bool:
    def shows() -> bool:
        flow.check_lease_local()
        try:
            return flow.rt.oned.host_info(host_id).state == state
        except OnedError as exc:
            if exc.missing:
                return False
            raise

    if shows():
        return True
    if wait_s <= 0:
        return False  # oned answered, and the host does not show it: nothing more will come of this call
    try:
        wait_until(shows, wait_s, interval_s=0.1, backoff=1.5, max_interval_s=1.0,
                   what=f"host {host_id} {state.name}")
    except WaitTimeout:
        return False
    return True


@step("list_vms_to_recover")
def list_vms_to_recover(flow: Flow, host: HostView, policy: ClusterPolicy,
                        prefetched: Future[list[VmView]] | None = None) -> list[VmView]:
    """The VMs to recover, from one extended `vmpool.infoset` read (started while fencing: reading is harmless).

    Extended, because oned's short body has no HA / HA_PRIORITY (`VirtualMachineTemplate::to_xml_short`)."""
    vms = prefetched.result() if prefetched is not None else flow.rt.oned.vm_pool_set(host.vm_ids, extended=True)
    chosen, opted_out = select_vms(vms, host.id, policy.include_suspended)
    if opted_out:
        flow.rt.store.set_fields(flow.incident.id, opted_out=",".join(str(v.id) for v in opted_out))
    return chosen


@step("dispatch_vm_recoveries")
def dispatch_vm_recoveries(flow: Flow, vms: list[VmView]) -> int:
    """Pending set first (one SADD), then RECOVERING, then one task per VM in priority order on the FIFO queue."""
    rt, inc = flow.rt, flow.incident
    order = [v.id for v in vms]
    rt.store.add_pending_vms(inc.id, order)
    rt.store.set_status(inc.id, Status.RECOVERING, order=json.dumps(order), vms_total=len(order))
    rt.send_all(TASK_RECOVER_VM, [[inc.id, vid] for vid in order], VM_QUEUE)
    rt.store.set_fields(inc.id, vm_tasks_sent=1)  # a re-run may trust that unstarted tasks are queued
    return len(order)


def redispatch_pending(flow: Flow) -> int:
    """A re-run after the VM tasks were sent (the incident's lease ran out): send again the VM tasks that were lost.

    While the VM queue moves, a task that never started is still queued behind others (a large failure): sending
    it again would only lengthen the queue, every lease, for every incident. Lost are the tasks that started and
    whose worker died (VM lease gone). When the queue has not moved for a lease, or the first run died before it
    had sent every task, every unfinished task is sent again. Sending again is safe either way: VM tasks are
    idempotent.
    """
    rt, inc = flow.rt, flow.incident
    pending = rt.store.pending_vms(inc.id)
    if not pending:
        pending = without_record(rt, inc)
        if not pending:
            finish_incident(rt, inc.id)
            return 0
        # Redis lost VM records (and the pending set) of VMs this incident chose: their tasks run again, re-read
        # each VM and record what they find (a VM already recovered: "already left the host"), so the count at
        # the close is true instead of leaving them out.
        flow.emit("records_lost", vms=sorted(pending))
        rt.store.add_pending_vms(inc.id, sorted(pending))
    order = [v for v in json.loads(inc.extra.get("order", "[]")) if v in pending]
    order += sorted(pending - set(order))
    trust_queue = bool(inc.extra.get("vm_tasks_sent")) and vm_queue_moving(rt)
    lost = _started_without_lease(rt, inc.id, order) if trust_queue else order
    flow.emit("redispatch", vms=len(lost), queued=len(order) - len(lost))
    rt.send_all(TASK_RECOVER_VM, [[inc.id, vid] for vid in lost], VM_QUEUE)
    if not trust_queue:
        rt.store.set_fields(inc.id, vm_tasks_sent=1)
    rt.extend(inc.id, force=True)
    return len(lost)


def vm_queue_moving(rt: Runtime) -> bool:
    """A worker took a task from the VM queue within the last lease."""
    last = rt.redis.get(rt.keys.vm_queue_moving)
    return last is not None and time.time() - float(last) < rt.settings.worker.task_lease_s


def _started_without_lease(rt: Runtime, incident_id: int, vm_ids: list[int]) -> list[int]:
    started = rt.store.started_vms(incident_id, vm_ids)
    pipe = rt.redis.pipeline(transaction=False)
    for v in vm_ids:
        pipe.exists(rt.keys.lock("vm", v))
    leased = pipe.execute()
    return [v for v, s, held in zip(vm_ids, started, leased, strict=True) if s and not held]


# Tasks' bodies ------------------------------------------------------------------------------------------------------
def recover_host(rt: Runtime, incident_id: int) -> str:
    inc = rt.store.get(incident_id)
    if inc is None or not inc.status.is_open:
        return "closed"
    if inc.kind is not Kind.HOST:
        raise ValueError(f"incident {incident_id} is a {inc.kind} incident, not a host incident")
    lease = rt.lease("host", inc.resource_id)
    if not lease.acquire():
        return "busy"  # another worker holds the host; if it dies, the lease expires and the watchdog re-sends
    with lease:
        flow = Flow(rt, inc, lease)
        rt.extend(inc.id)
        return _host_flow(flow)


def _host_flow(flow: Flow) -> str:
    """confirm_host_failed -> check_storm / pause -> fence_host -> list_vms_to_recover -> dispatch_vm_recoveries."""
    inc = flow.incident
    if inc.status is Status.RECOVERING:
        return _continue_recovering(flow)
    found = _confirmed_failed_host(flow)
    if isinstance(found, str):
        return found
    host, pool = found
    held = _hold_if_storm_or_paused(flow, host, pool)
    if held is not None:
        return held
    policy = flow.rt.settings.policy.for_cluster(inc.cluster_id)
    flow.rt.store.set_status(inc.id, Status.RUNNING)
    vms_read = _read_ahead(flow, host, policy)
    if not _fenced(flow, host, policy, vms_read):
        return "fence_failed"
    if proven_dead(flow):
        if not take_host_offline(flow, host):
            return _offline_not_confirmed(flow, host, vms_read)
        if policy.host_action == "migrate" and not expose_vms_to_probe(flow, host):
            flow.emit("not_disabled", host=host.id)  # its RUNNING VMs take migrate_fallback at once
    return _recover_vms(flow, host, policy, vms_read)


def _continue_recovering(flow: Flow) -> str:
    """A re-run once the VM tasks were sent: send again those that were lost (not while paused)."""
    if flow.rt.pause_reason() is not None:
        flow.recheck_later()
        return "paused"  # its VM tasks stopped at the gate; `resume` makes it due again
    redispatch_pending(flow)
    return "redispatched"


def _confirmed_failed_host(flow: Flow) -> tuple[HostView, list[HostView]] | str:
    """(the failed host, the host pool), or the task's result when the incident closed: host gone or not failed."""
    rt, inc = flow.rt, flow.incident
    fenced = bool(inc.extra.get("fenced_at"))
    try:
        host, pool = confirm_host_failed(flow)
    except OnedError as exc:
        if not exc.missing:
            raise
        # Deleted from oned: nothing left to recover, and raising would re-dispatch it every lease for ever.
        rt.store.close(inc, Status.NO_ACTION, "the host no longer exists in oned", handled=False)
        return "no_action"
    if not fenced and not host.failed and not proven_dead(flow):
        # (A host proven dead by a detector may still be MONITORED/INIT in oned: it is accepted as it is.)
        came_back = host.state not in (HostState.DISABLED, HostState.OFFLINE)
        rt.store.close(inc, Status.NO_ACTION, f"host is {host.state.name}", handled=not came_back)
        return "no_action"
    return host, pool


def _hold_if_storm_or_paused(flow: Flow, host: HostView, pool: list[HostView]) -> str | None:
    """Before fencing (powering a host off is an action too): HELD on a storm or an operator's pause."""
    inc = flow.incident
    # A detector's proof comes with its fence already done, but the host is not yet OFFLINE in oned: taking it
    # OFFLINE and recovering its VMs are actions, so the storm guard still applies until then.
    if not inc.extra.get("fenced_at") or (proven_dead(flow) and host.state != HostState.OFFLINE):
        reason = check_storm(flow, host, pool)
        if reason is not None:
            return flow.hold(reason, f"storm guard: {reason}; held until `oneha incidents approve {inc.id}`")
    paused = flow.rt.pause_reason()
    if paused is not None:
        return flow.hold(paused, f"host {host.id} failed while recovery is paused ({paused}); held until "
                                 "`oneha incidents resume`")
    return None


def _read_ahead(flow: Flow, host: HostView, policy: ClusterPolicy) -> Future[list[VmView]] | None:
    """Read the VMs (and, for migrate, the datastores) while the fence command runs: reading changes nothing, and
    nothing acts before the fence succeeded. Each VM task re-reads its VM again before acting."""
    if policy.host_action == "none":
        return None
    vms_read = _READS.submit(flow.rt.oned.vm_pool_set, host.vm_ids, extended=True)
    if policy.host_action == "migrate":
        _READS.submit(flow.rt.oned.shared_system_datastores)
    return vms_read


def _fenced(flow: Flow, host: HostView, policy: ClusterPolicy, vms_read: Future[list[VmView]] | None) -> bool:
    """Fence; on failure FENCE_FAILED with an alert, and no VM touched."""
    rt, inc = flow.rt, flow.incident
    try:
        fence = fence_host(flow, host, policy)
    except BaseException:
        if vms_read is not None:
            vms_read.cancel()
        raise
    if not fence.ok:
        rt.store.set_status(inc.id, Status.FENCE_FAILED, fence.detail or fence.result)
        rt.store.unschedule(inc.id)  # an operator must act; `oneha incidents approve` retries
        rt.hooks.alert(flow, f"fencing host {host.id} failed: {fence.detail}; no VM touched")
        return False
    rt.extend(inc.id, force=True)  # back to one lease: the fence's extra time is over
    return True


def _offline_not_confirmed(flow: Flow, host: HostView, vms_read: Future[list[VmView]] | None) -> str:
    """No VM may be touched while oned may still place VMs on the dead host: held, alerted, tried again."""
    if vms_read is not None:
        vms_read.cancel()
    return flow.hold("host not confirmed OFFLINE in oned",
                     f"host {host.id} was proven dead ({flow.incident.extra.get('proof')}) but oned does not show it "
                     "OFFLINE: no VM touched; tried again every storm_recheck_s")


def _recover_vms(flow: Flow, host: HostView, policy: ClusterPolicy, vms_read: Future[list[VmView]] | None
                 ) -> str:
    rt, inc = flow.rt, flow.incident
    if policy.host_action == "none":
        rt.store.close(inc, Status.NO_ACTION, "host_action = none: fenced, VMs left to the operator")
        return "no_action"
    vms = list_vms_to_recover(flow, host, policy, vms_read)
    if not vms:
        rt.store.close(inc, Status.RECOVERED, "no VM left to recover on the host (VMs that had already left it, "
                                              "e.g. recovered by an earlier incident, are not counted)")
        return "recovered"
    flow.check_lease()
    dispatch_vm_recoveries(flow, vms)
    return "dispatched"


__all__ = ["check_storm", "confirm_host_failed", "dispatch_vm_recoveries", "expose_vms_to_probe", "fence_host",
           "finish_incident",
           "list_vms_to_recover", "proven_dead", "recover_host", "redispatch_pending", "storm_reason",
           "take_host_offline", "vm_queue_moving"]
