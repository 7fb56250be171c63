"""The host-failure flow: one incident, small named steps, each re-reading state and safe to repeat.

    recover_host(incident)            TASK_RECOVER_HOST
      lock_host -> confirm_host_failed -> check_storm -> fence_host -> list_vms_to_recover -> dispatch_vm_recoveries
    recover_host_vm(incident, vm)     TASK_RECOVER_VM, one per VM, in priority order
      claim_vm -> (re-read, decide, act, confirm_vm_left_host)* -> record -> the last one closes the incident

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

import redis

from oneha.celeryconf import TASK_SOFT_TIME_LIMIT_S
from oneha.incidents import Incident, Kind, Status
from oneha.keys import TASK_RECOVER_VM, VM_QUEUE
from oneha.opennebula import ErrorKind, HostState, HostView, VmView
from oneha.settings import ClusterPolicy
from oneha.workers.fence import FenceResult, run_fence
from oneha.workers.hooks import step
from oneha.workers.oned import OnedError
from oneha.workers.runtime import Flow, Paused, Runtime
from oneha.workers.vm_steps import claim_vm, recover_vm_of_host, release_vm, select_vms

log = logging.getLogger(__name__)

OK_RESULTS = frozenset({"recovered", "dry_run", "skipped", "gone"})
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
    if order:
        rt.redis.sadd(rt.keys.incident_pending_vms(inc.id), *order)
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
    pending = {int(v) for v in rt.redis.smembers(rt.keys.incident_pending_vms(inc.id))}
    if not pending:
        pending = _without_record(rt, inc)
        if not pending:
            finish_incident(rt, inc.id)
            return 0
        # Redis lost VM records (and the pending set) of VMs this incident chose: their tasks run again, re-read
        # each VM and record what they find (a VM already recovered: "already left the host"), so the count at
        # the close is true instead of leaving them out.
        rt.store.audit(inc.id, "records_lost", vms=sorted(pending))
        rt.redis.sadd(rt.keys.incident_pending_vms(inc.id), *pending)
    order = [v for v in json.loads(inc.extra.get("order", "[]")) if v in pending]
    order += sorted(pending - set(order))
    trust_queue = bool(inc.extra.get("vm_tasks_sent")) and vm_queue_moving(rt)
    lost = _started_without_lease(rt, inc.id, order) if trust_queue else order
    rt.store.audit(inc.id, "redispatch", vms=len(lost), queued=len(order) - len(lost))
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
    pipe = rt.redis.pipeline(transaction=False)
    pipe.smismember(rt.keys.incident_started_vms(incident_id), [str(v) for v in vm_ids])
    for v in vm_ids:
        pipe.exists(rt.keys.lock("vm", v))
    started, *leased = pipe.execute()
    return [v for v, s, held in zip(vm_ids, started, leased, strict=True) if s and not held]


# KEYS: pending set. ARGV: vm id. Remove it; 1 if we removed the last one (we close), else 0.
_FINISH_VM = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if removed == 1 and redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"""


def _without_record(rt: Runtime, inc: Incident) -> set[int]:
    """VMs the incident chose (its `order`) that have no record."""
    chosen = {int(v) for v in json.loads(inc.extra.get("order", "[]"))}
    return chosen - set(rt.store.vm_records(inc.id)) if chosen else set()


def finish_incident(rt: Runtime, incident_id: int) -> Status | None:
    """Close a host incident once every selected VM has its record: RECOVERED, or PARTIAL with the failures (a VM
    chosen but without a record — lost with Redis — counts as not recovered, never as nothing)."""
    inc = rt.store.get(incident_id)
    if inc is None or not inc.status.is_open:
        return None
    records: dict[int, dict[str, object]] = {v: {"result": "no_record"} for v in _without_record(rt, inc)}
    records.update(rt.store.vm_records(incident_id))
    bad = {vid: r.get("result") for vid, r in records.items() if r.get("result") not in OK_RESULTS}
    if bad:
        status = Status.PARTIAL
        detail = f"{len(records) - len(bad)}/{len(records)} VMs recovered; not: " + ", ".join(
            f"{v}:{r}" for v, r in sorted(bad.items())[:20])
    elif records and all(r.get("result") == "dry_run" for r in records.values()):
        status = Status.NO_ACTION  # a drill: nothing was changed, and the record must not say otherwise
        detail = f"dry run: {len(records)} VMs would have been recovered; nothing changed in oned"
    else:
        status = Status.RECOVERED
        detail = f"{len(records)} VMs recovered"
    rt.store.close(inc, status, detail)
    return status


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
    rt, inc = flow.rt, flow.incident
    policy = rt.settings.policy.for_cluster(inc.cluster_id)
    if inc.status is Status.RECOVERING:
        if rt.pause_reason() is not None:
            rt.store.schedule(inc.id, time.time() + rt.settings.worker.storm_recheck_s)
            return "paused"  # its VM tasks stopped at the gate; `resume` makes it due again
        redispatch_pending(flow)
        return "redispatched"
    fenced = bool(inc.extra.get("fenced_at"))
    try:
        host, pool = confirm_host_failed(flow)
    except OnedError as exc:
        if not exc.missing:
            raise
        # Deleted from oned: nothing left to recover, and raising would re-dispatch it every lease for ever.
        rt.store.close(inc, Status.NO_ACTION, "the host no longer exists in oned", handled=False)
        return "no_action"
    if not fenced and not host.failed:
        came_back = host.state not in (HostState.DISABLED, HostState.OFFLINE)
        rt.store.close(inc, Status.NO_ACTION, f"host is {host.state.name}", handled=not came_back)
        return "no_action"
    if not fenced:
        reason = check_storm(flow, host, pool)
        if reason is not None:
            return _hold(flow, reason, f"storm guard: {reason}; held until `oneha incidents approve {inc.id}`")
    paused = rt.pause_reason()
    if paused is not None:  # before fencing: powering a host off is an action too
        return _hold(flow, paused, f"host {host.id} failed while recovery is paused ({paused}); held until "
                                   "`oneha incidents resume`")
    rt.store.set_status(inc.id, Status.RUNNING)
    # Read the VMs (and, for migrate, the datastores) while the fence command runs: reading changes nothing, and
    # nothing below acts before the fence succeeded. Each VM task re-reads its VM again before acting.
    vms_read: Future[list[VmView]] | None = None
    if policy.host_action != "none":
        vms_read = _READS.submit(rt.oned.vm_pool_set, host.vm_ids, extended=True)
        if policy.host_action == "migrate":
            _READS.submit(rt.oned.shared_system_datastores)
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
        return "fence_failed"
    rt.extend(inc.id, force=True)  # back to one lease: the fence's extra time is over
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


def _hold(flow: Flow, reason: str, alert: str) -> str:
    """HELD, looked at again every `storm_recheck_s`; the alert only when it becomes held."""
    rt, inc = flow.rt, flow.incident
    if inc.status is not Status.HELD:
        rt.hooks.alert(flow, alert)
    rt.store.set_status(inc.id, Status.HELD, reason)
    rt.store.schedule(inc.id, time.time() + rt.settings.worker.storm_recheck_s)
    return "held"


def recover_host_vm(rt: Runtime, incident_id: int, vm_id: int) -> str:
    # One round trip: the incident and whether this VM is still pending.
    pending_key = rt.keys.incident_pending_vms(incident_id)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hgetall(rt.keys.incident(incident_id))
    pipe.sismember(pending_key, str(vm_id))
    raw, pending = pipe.execute()
    inc = Incident.from_hash(raw) if raw else None
    if inc is None or not inc.status.is_open:
        return "closed"
    if not pending:
        return "done"
    rt.extend(incident_id)
    flow = Flow(rt, inc, trail=[])
    lease = rt.lease("vm", vm_id)
    # The claim, the VM lease and "started" (a re-run then knows this task is not still queued): one round trip.
    owner = claim_vm(flow, vm_id, lease, rt.keys.incident_started_vms(incident_id))
    if owner != incident_id:
        if lease.token is not None:
            lease.release()
        outcome_record = {"action": "none", "result": "skipped", "attempts": 0,
                          "detail": f"in recovery by incident {owner}"}
        _finish_vm(flow, vm_id, outcome_record)
        return "skipped"
    if lease.token is None:
        return "busy"
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
        rt.store.audit(incident_id, "paused", vm=vm_id)
        raise
    except BaseException:
        lease.release()  # the claim stays until it expires: a retry of this incident takes it again
        raise
    pipe = rt.redis.pipeline(transaction=False)
    lease.release(pipe)
    release_vm(flow, vm_id, pipe)
    pipe.execute()
    return outcome.result


def _finish_vm(flow: Flow, vm_id: int, record: dict[str, object], pipe: redis.client.Pipeline | None = None
               ) -> None:
    """Record the VM and take it off the pending set (one round trip, with whatever `pipe` already holds)."""
    rt, inc = flow.rt, flow.incident
    pipe = pipe if pipe is not None else rt.redis.pipeline(transaction=False)
    pipe.hset(rt.keys.incident_vms(inc.id), str(vm_id), json.dumps(record, sort_keys=True))
    pipe.eval(_FINISH_VM, 1, rt.keys.incident_pending_vms(inc.id), str(vm_id))
    last = pipe.execute()[-1]
    if int(last) == 1:
        finish_incident(rt, inc.id)
    else:
        rt.extend(inc.id)


__all__ = ["check_storm", "confirm_host_failed", "dispatch_vm_recoveries", "fence_host", "finish_incident",
           "list_vms_to_recover", "recover_host", "recover_host_vm", "redispatch_pending",
           "storm_reason", "vm_queue_moving"]


