"""The lab's scheduler in the `fast` profile (mm_sched, simplified): PENDING VMs get a host, resched'ed VMs are
migrated, at most 200 dispatches a tick. The timed profiles schedule with `lab.timeline` instead; `choose_host` also
places the VMs `lab.vm.create` makes.

Modelled on OpenNebula 7.4's scheduler input (`src/schedm/SchedulerManagerDriver.cc`: pending and resched'ed VMs,
hosts matched with `state = 2`, i.e. MONITORED only) and the resched flag (`src/dm/DispatchManagerActions.cc`,
`DispatchManager::resched`). The window, plan and per-host action limits are `lab.timeline`'s (production profile);
least-loaded placement instead of the rank expressions is listed in docs/architecture.md's lab deviations.
"""

from __future__ import annotations

from typing import Any

from oneha.lab.lifecycle import migrate_to
from oneha.lab.model import ACT_MIGRATE, ACT_NONE, Host, LabError, Vm, as_int, fits
from oneha.lab.state import CloudState
from oneha.opennebula import ErrorCode, HostState, VmState


def schedule(c: CloudState) -> None:
    """One scheduler pass: dispatch PENDING VMs, migrate resched'ed ones, drop the rest from `pending`."""
    for vid in sorted(c.pending)[:200]:
        vm = c.vms[vid]
        if vm.state == VmState.PENDING:
            dispatch(c, vm)
        elif vm.resched and not vm.plan:
            dispatch_resched(c, vm)
        else:
            c.pending.discard(vid)


def dispatch(c: CloudState, vm: Vm) -> None:
    prefer = c.hosts[vm.hid].cluster_id if vm.hid is not None else None
    host = choose_host(c, vm, exclude=None, cluster=prefer, strict=False)
    if host is None:
        return
    c.pending.discard(vm.id)
    c._open_history(vm, host, ACT_NONE)
    c._start_plan(vm, [(VmState.ACTIVE, "PROLOG"), (VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")])
    c._log_call("scheduler", "deploy", vm.id, host.id, "")


def dispatch_resched(c: CloudState, vm: Vm) -> None:
    old = c.hosts[vm.hid] if vm.hid is not None else None
    cluster = old.cluster_id if old is not None else None
    host = choose_host(c, vm, exclude=vm.hid, cluster=cluster, strict=True)
    if host is None:
        return
    c.pending.discard(vm.id)
    vm.resched = False
    migrate_to(c, vm, host, live=False, action=ACT_MIGRATE)  # the scheduler's migrate: history says MIGRATE


def choose_host(c: CloudState, vm: Vm, exclude: int | None, cluster: int | None, strict: bool = False) -> Host | None:
    """Least-loaded MONITORED host with room (CPU and memory, `fits`); same cluster preferred (required when
    strict)."""
    best: Host | None = None
    best_key: tuple[int, int, int] | None = None
    for host in c.hosts.values():
        if host.state != HostState.MONITORED or host.id == exclude or not fits(host, vm):
            continue
        if strict and host.cluster_id != cluster:
            continue  # resched keeps the VM on its system datastore, i.e. in its cluster
        # No look at host.power: like mm_sched, the lab may pick a host that died but is not ERROR yet;
        # the deployment then fails there (PROLOG_FAILURE), as it would on oned.
        key = (0 if cluster is None or host.cluster_id == cluster else 1, len(host.vm_ids), host.id)
        if best_key is None or key < best_key:
            best, best_key = host, key
    return best


def place_for(c: CloudState, vm: Vm, pinned: Any) -> Host:
    if pinned is not None and str(pinned) != "":
        host = c.hosts.get(as_int(pinned, "HOST"))
        if host is None:
            raise LabError(ErrorCode.NO_EXISTS, f"Error getting host [{pinned}].", as_int(pinned, "HOST"))
        return host
    host = choose_host(c, vm, exclude=None, cluster=None)
    if host is None:
        raise LabError(ErrorCode.ACTION, "No host with enough capacity to create the VM")
    return host

