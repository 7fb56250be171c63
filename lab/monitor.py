"""What the lab's monitoring does: hosts that fall silent or answer again, and the VM state probe.

In the `fast` profile `monitor` runs on every tick: a host silent for `monitoring_interval_s` is declared lost
(REFERENCE §3, `src/monitor/src/monitor/HostMonitorManager.cc`); the timed profiles (`lab.timeline`) call
`host_silent` and `host_answers` on monitord's own timeline instead. `probe_vms` reports domains that stopped behind
oned's back as the monitor's MISSING_STATE or FAILURE, behind oned's state guard.
"""

from __future__ import annotations

import time

from oneha.lab.model import ACT_MONITOR, POWER_ON, Host, L, Vm
from oneha.lab.state import CloudState
from oneha.opennebula import HostState, VmState


def monitor(c: CloudState, now: float) -> None:
    for host in c.hosts.values():
        if host.state == HostState.OFFLINE:
            continue  # not monitored at all (`HostMonitorManager::update_host` stops it)
        if host.power == POWER_ON:
            if host.lost or host.state == HostState.INIT or host.wiped:
                host_answers(c, host)
            continue
        if host.lost or host.silent_since is None or now - host.silent_since < c.monitoring_interval_s:
            continue
        host_silent(c, host)


def host_silent(c: CloudState, host: Host) -> None:
    """monitord gave up: ERROR first (not for DISABLED/OFFLINE, REFERENCE §1), then RUNNING VMs go UNKNOWN."""
    host.lost = True
    # `Host::error` (src/host/Host.cc): the template's ERROR says when and why (monitord gives no message for
    # a silent host, `HostMonitorManager.cc`), and the state becomes ERROR unless DISABLED/OFFLINE.
    host.template["ERROR"] = f"{time.ctime()} : Error monitoring Host {host.name} ({host.id}): "
    c._touch_host(host)
    if host.state not in (HostState.DISABLED, HostState.OFFLINE):
        c._set_host(host, HostState.ERROR)
    for vid in sorted(host.vm_ids):
        vm = c.vms[vid]
        if vm.state == VmState.ACTIVE and vm.lcm == L("RUNNING"):
            vm.resched = False  # `trigger_monitor_done` (LifeCycleStates.cc) clears RESCHED
            c.pending.discard(vid)
            c._set(vm, VmState.ACTIVE, L("UNKNOWN"))


def host_answers(c: CloudState, host: Host) -> None:
    """Heard from again: MONITORED, and its UNKNOWN VMs RUNNING if really there; a missing domain is reported
    as the MISSING_STATE by the VM probe (`probe_vms`). `Host::update_info` (src/host/Host.cc) ignores a report of
    an OFFLINE host and keeps DISABLED; any other state (ERROR, INIT) becomes MONITORED, capacity known again."""
    if host.state == HostState.OFFLINE:
        return
    host.lost = False
    host.silent_since = None
    if host.template.pop("ERROR", None) is not None or host.wiped:  # cleared / filled in by the report
        host.wiped = False
        c._touch_host(host)
    if host.state in (HostState.ERROR, HostState.INIT):
        c._set_host(host, HostState.MONITORED)
    for vid in sorted(host.vm_ids):
        vm = c.vms[vid]
        if vm.state == VmState.ACTIVE and vm.lcm == L("UNKNOWN") and not vm.plan:
            if host.id in c.running.get(vid, ()):
                c._set(vm, VmState.ACTIVE, L("RUNNING"))  # `trigger_monitor_poweron`
            elif vid not in c.vanished:
                c.vanished[vid] = ("missing", c.clock(), host.id)


def probe_vms(c: CloudState, now: float) -> None:
    """What the VM state probe reports about domains that stopped behind oned's back, and what oned does.

    One report per monitoring interval; ignored while the VM is within the state guard of its RUNNING start
    (`test_and_trigger`). A report from a host the front-end cannot hear does not arrive."""
    for vid, (reason, since, hid) in sorted(c.vanished.items()):
        vm = c.vms[vid]
        if vm.hid != hid or vm.plan or not (vm.state == VmState.ACTIVE and vm.lcm in (L("RUNNING"), L("UNKNOWN"))):
            del c.vanished[vid]  # moved, acted on or already stopped: the report changes nothing
            continue
        host = c.hosts[hid]
        if host.power != POWER_ON or host.lost or host.state == HostState.OFFLINE or \
                now - since < c.monitoring_interval_s:
            continue  # (an OFFLINE host is not monitored: its VMs stay as they are, `InformationManager.cc`)
        if now - vm.running_since < c.state_guard_s:
            continue  # "Ignoring VM state update"
        del c.vanished[vid]
        reported = c.missing_state if reason == "missing" else "FAILURE"
        if reported == "POWEROFF":
            monitor_poweroff(c, vm)
        elif vm.lcm == L("RUNNING"):
            c._set(vm, VmState.ACTIVE, L("UNKNOWN"))  # `trigger_monitor_done` (only from RUNNING)


def status_changed(c: CloudState, host: Host, old: HostState) -> None:
    """monitord told of an operator's status change (`HostMonitorManager::update_host`, HostMonitorManager.cc):
    to OFFLINE it stops monitoring the host; from OFFLINE it probes the host at once (the timed profiles: the IM
    driver's start_monitor takes `start_monitor_s` to fail on a dead host; `fast`: now). Any other change only
    goes on monitoring as before (a DISABLED host is still probed, and still "fails": its RUNNING VMs go UNKNOWN
    with no host event, `host_silent`)."""
    timing = c.timing
    if host.state == HostState.OFFLINE:
        if timing is not None:
            timing.probing.pop(host.id, None)
        return
    if old != HostState.OFFLINE:
        if host.state == HostState.INIT and host.power != POWER_ON and host.lost:
            # enabled while monitord had given up on it: INIT until its next probe fails again (ERROR)
            host.lost = False
            host.silent_since = c.clock()
        return
    host.lost = False  # a fresh probe: what it finds now decides
    # Never inside the call: a real oned 7.4 answers `one.host.status` with the host INIT (or DISABLED), capacity
    # still 0, and reports MONITORED ~3 s later, after its first monitoring message (seen). `fast`: the next tick.
    if timing is not None:
        timing.start_probe(host)
    elif host.power != POWER_ON:
        host_silent(c, host)


def monitor_poweroff(c: CloudState, vm: Vm) -> None:
    """`trigger_monitor_poweroff` + `trigger_poweroff_success`: SHUTDOWN_POWEROFF, then POWEROFF, RESCHED
    cleared, the history record's ACTION set to MONITOR (44) with no user."""
    vm.resched = False
    c.pending.discard(vm.id)
    if vm.history:
        vm.history[-1].action = ACT_MONITOR
    c._set(vm, VmState.ACTIVE, L("SHUTDOWN_POWEROFF"))
    c._set(vm, VmState.POWEROFF, L("LCM_INIT"))

