"""Placement that does not wait for oned's scheduler (issue 13, contract point 6; `placement = "oneha"`).

A VM of a failed host that `recover 4` left PENDING is deployed by its own VM task (`vm_task`), right after the
loop saw it leave the host:

    wait_pending -> (whole body) scheduler_reason -> choose_host (host pool, open host incidents, reservations,
    reserve) -> deploy_vm (`one.vm.deploy`, enforce on) -> confirm_placed

Why it is safe and what it leaves to oned (docs/research/oned-agreement.md §3-§4):
- `one.vm.deploy` is accepted only from PENDING/HOLD/STOPPED/UNDEPLOYED (`VirtualMachineAPI.cc:594-602`), so a VM
  the scheduler placed first is refused with ACTION: re-read, nothing to undo (the plan action of a VM oneha placed
  fails the same way, harmlessly). It accepts any host but an OFFLINE one, so only MONITORED hosts are chosen here.
- enforce checks CPU and memory (`HostShare::test_compute`) but is a check, not a reservation: the room oneha takes
  on a host is kept in Redis (`keys.placement_reserved`) for `worker.placement_reservation_s`, and counted against
  every host pool read older than it (minus a margin for oned's LCM, which adds the capacity after the call).
- deploy evaluates no SCHED_REQUIREMENTS and no VM group: a VM with anything oneha cannot evaluate exactly is left
  PENDING to the scheduler (`scheduler_reason`), as are VMs that fit nowhere. Any failure here leaves the VM
  PENDING, where the scheduler (already asked by `recover 4`'s `trigger_place`) is the backstop.
- The order is the dispatch order of the VM tasks (highest HA_PRIORITY first, FIFO queue): with fewer worker slots
  than VMs, lower priorities start placing only as higher ones finish; VMs placing at the same moment each take the
  most free host left, so under scarce capacity priority is honoured only as far as the dispatch order goes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from oneha.opennebula import HostState, HostView, LcmState, VmState, VmView
from oneha.settings import ClusterPolicy
from oneha.workers.hooks import step
from oneha.workers.outcomes import CallOutcome
from oneha.workers.runtime import Flow
from oneha.workers.vm_steps import confirm, deploy_vm, read_vm

LCM_MARGIN_S = 5.0  # a deploy accepted this long before a host pool read may not be counted in it yet
POOL_MAX_AGE_S = 1.0  # concurrent VM tasks of one process share a host pool read this fresh
CONFIRM_PLACED_S = 10.0  # oned sets ACTIVE before it answers (DispatchManager::deploy): a read shows it at once
ATTEMPTS = 3


# Pure decisions ----------------------------------------------------------------------------------------------------
def scheduler_reason(vm: VmView) -> str | None:
    """Why oneha leaves this VM to oned's scheduler; None when oneha can evaluate all its placement constraints.

    Read from the whole body (the short one has no vectors). No SCHED_REQUIREMENTS is evaluated, not even simple
    ones: a wrong reading would place a VM where its owner said it must not run. AUTOMATIC_REQUIREMENTS (cluster,
    PUBLIC_CLOUD, PIN_POLICY = PINNED hosts) is kept by `candidate_hosts`. SCHED_RANK is a preference, not a
    constraint: oneha spreads by free capacity instead.
    """
    for name in ("SCHED_REQUIREMENTS", "SCHED_DS_REQUIREMENTS"):
        if (vm.user_template.get(name) or vm.template.get(name) or "").strip():
            return name
    if "VMGROUP" in vm.template_vectors:
        return "VM group"
    if "PCI" in vm.template_vectors:
        return "PCI devices"
    if "NUMA_NODE" in vm.template_vectors or vm.pin_policy.upper() not in ("", "NONE"):
        return "NUMA pinning"
    if vm.cpu <= 0 or vm.mem <= 0:
        return "no CPU or MEMORY in its template"
    return None


@dataclass(frozen=True, slots=True)
class Room:
    host_id: int
    cpu: int  # free after oned's usage and oneha's reservations
    mem: int
    share: float  # the scarcer of the two, as a share of the host's capacity: the spreading key


def candidate_hosts(vm: VmView, hosts: list[HostView], cluster_id: int, failed_host_id: int,
                    blocked: set[int], reserved: dict[int, tuple[int, int]]) -> list[Room]:
    """Hosts the VM may be deployed on, most free first: MONITORED, in its cluster, not the failed host nor one
    another open incident is about, not PUBLIC_CLOUD / PIN_POLICY = PINNED (AUTOMATIC_REQUIREMENTS), with room
    for its CPU and memory once reservations are taken off."""
    rooms = []
    for h in hosts:
        if h.id == failed_host_id or h.id in blocked or h.state != HostState.MONITORED or h.cluster_id != cluster_id:
            continue
        if h.template.get("PUBLIC_CLOUD", "").upper() == "YES" or h.template.get("PIN_POLICY", "").upper() == "PINNED":
            continue
        rc, rm = reserved.get(h.id, (0, 0))
        cpu, mem = h.max_cpu - h.cpu_usage - rc, h.max_mem - h.mem_usage - rm
        if cpu >= vm.cpu and mem >= vm.mem:
            share = min(cpu / max(1, h.max_cpu), mem / max(1, h.max_mem))
            rooms.append(Room(h.id, cpu, mem, share))
    return sorted(rooms, key=lambda r: (-r.share, r.host_id))


# Reservations (Redis) ------------------------------------------------------------------------------------------------
# KEYS: the host's reservations. ARGV: now, ttl s, counted since, free cpu, free mem, member, cpu, mem.
# Drop expired entries; count those newer than the pool read (minus the margin), but not this VM's own; take the
# room if it is still there.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local cpu, mem = 0, 0
local vm = string.match(ARGV[6], '^(%d+):')
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')) do
  local v, c, k = string.match(m, '^(%d+):(%d+):(%d+)$')
  if v and v ~= vm then cpu = cpu + tonumber(c); mem = mem + tonumber(k) end
end
if tonumber(ARGV[4]) - cpu < tonumber(ARGV[7]) or tonumber(ARGV[5]) - mem < tonumber(ARGV[8]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
"""


def _member(vm: VmView) -> str:
    return f"{vm.id}:{vm.cpu}:{vm.mem}"


def reserved_since(flow: Flow, host_ids: list[int], since: float) -> dict[int, tuple[int, int]]:
    """(cpu, mem) oneha reserved on each host after `since`: one pipeline."""
    pipe = flow.rt.redis.pipeline(transaction=False)
    for hid in host_ids:
        pipe.zrangebyscore(flow.rt.keys.placement_reserved(hid), since, "+inf")
    out: dict[int, tuple[int, int]] = {}
    for hid, members in zip(host_ids, pipe.execute(), strict=True):
        parts = [m.split(":") for m in members]
        out[hid] = (sum(int(p[1]) for p in parts if len(p) == 3), sum(int(p[2]) for p in parts if len(p) == 3))
    return out


def reserve(flow: Flow, vm: VmView, room: Room, host_free: tuple[int, int], since: float) -> bool:
    ttl = flow.rt.settings.worker.placement_reservation_s
    args = (time.time(), ttl, since, host_free[0], host_free[1], _member(vm), vm.cpu, vm.mem)
    return bool(flow.rt.redis.eval(_RESERVE, 1, flow.rt.keys.placement_reserved(room.host_id), *args))


def unreserve(flow: Flow, vm: VmView, host_id: int) -> None:
    flow.rt.redis.zrem(flow.rt.keys.placement_reserved(host_id), _member(vm))


# The host pool, shared by the VM tasks of a process ------------------------------------------------------------------
@dataclass
class _PoolCache:
    lock: threading.Lock = field(default_factory=threading.Lock)
    read: tuple[float, float, list[HostView]] | None = None  # (monotonic, epoch when the read started, pool)


_POOLS: dict[int, _PoolCache] = {}
_POOLS_LOCK = threading.Lock()


def host_pool(flow: Flow) -> tuple[float, list[HostView]]:
    """(epoch when the read started, the host pool): one `hostpool.info` per POOL_MAX_AGE_S per oned gateway."""
    with _POOLS_LOCK:
        cache = _POOLS.setdefault(id(flow.rt.oned), _PoolCache())
    with cache.lock:
        if cache.read is None or time.monotonic() - cache.read[0] > POOL_MAX_AGE_S:
            started, mono = time.time(), time.monotonic()
            cache.read = (mono, started, flow.rt.oned.host_pool())
        return cache.read[1], cache.read[2]


# Steps ---------------------------------------------------------------------------------------------------------------
@step("wait_pending")
def wait_pending(flow: Flow, vm_id: int, timeout_s: float) -> VmView | None:
    """Wait out oned's cleanup on the dead host (CLEANUP_RESUBMIT): the VM as it is next (None: gone/timeout)."""
    def settled(vm: VmView) -> bool | None:
        return None if vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.CLEANUP_RESUBMIT else True

    return confirm(flow, vm_id, settled, timeout_s)


@step("choose_host")
def choose_host(flow: Flow, vm: VmView, failed_host_id: int, tried: set[int]) -> int | None:
    """The most free host with room that oneha could reserve for the VM; None when there is none."""
    read_at, pool = host_pool(flow)
    # The cluster of the VM's last host (its history's CID), i.e. the failed host's: AUTOMATIC_REQUIREMENTS ties
    # the VM to it (its datastores and networks are there).
    cluster_id = vm.cluster_id if vm.cluster_id >= 0 else flow.incident.cluster_id
    in_cluster = [h for h in pool if h.cluster_id == cluster_id and h.id not in tried]
    incidents = flow.rt.store.open_incident_ids("host", [h.id for h in in_cluster])
    blocked = {h.id for h, inc in zip(in_cluster, incidents, strict=True) if inc is not None}
    since = read_at - LCM_MARGIN_S
    reserved = reserved_since(flow, [h.id for h in in_cluster if h.id not in blocked], since)
    by_id = {h.id: h for h in in_cluster}
    for room in candidate_hosts(vm, in_cluster, cluster_id, failed_host_id, blocked, reserved):
        h = by_id[room.host_id]
        if reserve(flow, vm, room, (h.free_cpu, h.free_mem), since):
            return room.host_id
    return None


@step("confirm_placed")
def confirm_placed(flow: Flow, vm_id: int) -> VmView | None:
    """The VM once it left PENDING (None: gone, or still PENDING at the deadline)."""
    return confirm(flow, vm_id, lambda vm: None if vm.state == VmState.PENDING else True, CONFIRM_PLACED_S)


# The phase -----------------------------------------------------------------------------------------------------------
def wants_placement(vm: VmView | None, policy: ClusterPolicy) -> bool:
    """The loop ended with the VM PENDING (or about to be, CLEANUP_RESUBMIT) and the cluster wants oneha to place."""
    if policy.placement != "oneha" or vm is None:
        return False
    return vm.state == VmState.PENDING or (vm.state == VmState.ACTIVE and vm.lcm_state == LcmState.CLEANUP_RESUBMIT)


def place_vm(flow: Flow, vm_id: int, failed_host_id: int, wait_s: float) -> dict[str, object]:
    """Deploy a PENDING VM of a failed host (waiting up to `wait_s` for it to be PENDING); the fields it adds to the
    VM's record. Never raises for oned's refusals: the VM then stays PENDING for the scheduler."""
    seen = wait_pending(flow, vm_id, wait_s)
    if seen is None or seen.state != VmState.PENDING:
        return _by_scheduler(flow, vm_id, f"not PENDING: {seen.state_name if seen else 'gone or still cleaning up'}",
                             seen)
    vm = flow.rt.oned.vm_info(vm_id)  # the whole body: VMGROUP, PCI and TOPOLOGY are not in the short one
    reason = scheduler_reason(vm)
    if reason is not None:
        return _by_scheduler(flow, vm_id, reason, None)
    return _deploy_somewhere(flow, vm, failed_host_id)


def _deploy_somewhere(flow: Flow, vm: VmView, failed_host_id: int) -> dict[str, object]:
    tried: set[int] = set()
    for _ in range(ATTEMPTS):
        host_id = choose_host(flow, vm, failed_host_id, tried)
        if host_id is None:
            return _by_scheduler(flow, vm.id, "no host of the cluster with room", None)
        tried.add(host_id)
        outcome = deploy_vm(flow, vm, host_id)
        if outcome is CallOutcome.DRY_RUN:
            unreserve(flow, vm, host_id)
            return {"placement": "dry_run", "placement_host": host_id}
        if outcome is CallOutcome.GONE:
            unreserve(flow, vm, host_id)
            return {"placement": "none", "placement_detail": "VM no longer exists"}
        if outcome is CallOutcome.ABANDONED:
            # oned never answered and may still apply this deploy: no deploy onto another host meanwhile, and the
            # room stays reserved until it expires (the VM may yet land there). run_call alerted.
            return _by_scheduler(flow, vm.id, f"the deploy on host {host_id} was never answered", None)
        seen = confirm_placed(flow, vm.id) if outcome is not CallOutcome.WRONG_STATE else read_vm(flow, vm.id)
        if seen is not None and seen.state != VmState.PENDING:
            return _placed(flow, vm, host_id, seen)
        unreserve(flow, vm, host_id)  # refused (enforce: the room went meanwhile) or not applied: next host
    return _by_scheduler(flow, vm.id, f"{ATTEMPTS} hosts refused it", None)


def _placed(flow: Flow, vm: VmView, host_id: int, seen: VmView) -> dict[str, object]:
    if seen.hid == host_id and seen.state == VmState.ACTIVE:
        flow.rt.hooks.placement(flow, vm.id, "oneha", host_id, "")
        return {"placement": "oneha", "placement_host": host_id}
    unreserve(flow, vm, host_id)
    return _by_scheduler(flow, vm.id, f"placed by oned's scheduler first ({seen.state_name} on host {seen.hid})",
                         seen)


def _by_scheduler(flow: Flow, vm_id: int, reason: str, seen: VmView | None) -> dict[str, object]:
    """Left to (or already done by) oned's scheduler: counted and audited, the VM untouched."""
    host = seen.hid if seen is not None and seen.state == VmState.ACTIVE else None
    flow.rt.hooks.placement(flow, vm_id, "scheduler", host, reason)
    return {"placement": "scheduler", "placement_detail": reason}

__all__ = ["Room", "candidate_hosts", "place_vm", "scheduler_reason", "wants_placement"]
