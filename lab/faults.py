"""Fault injection (`lab.*` calls): what happens to the truth when a host loses power, is cut off or fenced, or a
domain stops behind oned's back. oned learns of it only later, through `lab.monitor`.
"""

from __future__ import annotations

from oneha.lab.model import ACT_NONE, CRASH_REASONS, POWER_OFF, POWER_ON, Host, L, LabError, Vm
from oneha.lab.scheduler import place_for
from oneha.lab.state import CloudState
from oneha.opennebula import ErrorCode, VmState


def power(c: CloudState, host: Host, power: str) -> None:
    """Set the hypervisor's power; off stops its domains. Either way the front-end stops hearing from it."""
    if power == POWER_OFF:
        now = c.clock()
        for vid, hosts in c.running.items():
            if host.id in hosts:
                hosts.discard(host.id)
                if c.vms[vid].hid == host.id:  # its domain is gone: the probe will miss it once it answers
                    c.vanished.setdefault(vid, ("missing", now, host.id))
    if host.silent_since is None:
        host.silent_since = c.clock()
    host.power = power


def revive(host: Host) -> None:
    """Powered on / reconnected: monitoring hears from it on the next tick."""
    host.power = POWER_ON
    if host.silent_since is not None and not host.lost:
        host.silent_since = None  # came back before monitoring noticed


def crash(c: CloudState, vm: Vm, reason: str) -> None:
    """The domain stops behind oned's back (see CRASH_REASONS); it runs nowhere at once, and oned learns it
    from the VM probe on a later tick: POWEROFF (the default MISSING_STATE) or UNKNOWN."""
    if reason not in CRASH_REASONS:
        raise LabError(ErrorCode.XML_RPC_API, f"reason must be one of {', '.join(CRASH_REASONS)}", vm.id)
    if not (vm.state == VmState.ACTIVE and vm.lcm == L("RUNNING")) or vm.hid is None:
        raise LabError(ErrorCode.ACTION, f"crash needs a RUNNING VM, VM {vm.id} is {vm.state_name()}", vm.id)
    c.running.pop(vm.id, None)
    c.vanished[vm.id] = (reason, c.clock(), vm.hid)


def fail(c: CloudState, vm: Vm, lcm_name: str, sticky: bool) -> None:
    """The VM lands in a failure LCM state now; sticky: every later pass through that stage fails too."""
    name = (lcm_name or "BOOT_FAILURE").upper()
    if not name.endswith("_FAILURE"):
        raise LabError(ErrorCode.XML_RPC_API, f"{name} is not a failure LCM state", vm.id)
    try:
        target = L(name)
    except KeyError:
        raise LabError(ErrorCode.XML_RPC_API, f"unknown LCM state {name}", vm.id) from None
    vm.sticky_fail = target if sticky else None
    vm.plan.clear()
    c.busy.discard(vm.id)
    c.pending.discard(vm.id)
    c._really_stop(vm, only_reachable=False)
    if vm.hid is None:  # never placed: give it a host so the failure has a history record
        c._open_history(vm, place_for(c, vm, None), ACT_NONE)
    c._set(vm, VmState.ACTIVE, target)
