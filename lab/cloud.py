"""The lab cloud's model: what oned believes (hosts, VMs, history) and the truth (where each VM really runs).

One lock guards everything. Time moves only in `tick()`, called by one background thread (see `lab.sim`):
transitional VM states advance after `step_delay_s`, the scheduler places PENDING and resched'ed VMs, and
monitoring declares silent hosts ERROR after `monitoring_interval_s` (REFERENCE §3,
`src/monitor/src/monitor/HostMonitorManager.cc`). Request handlers never sleep: they change state and return.

Two views are kept apart on purpose, because oneha's whole job lives in the gap between them:
- oned's view: host STATE, VM STATE/LCM_STATE, history records, HOST/VMS. This is what the XML-RPC API shows.
- the truth: `running[vm_id]` = the set of host ids where the VM's domain really runs. Killing or fencing a host stops
  its domains; a partition keeps them running while oned loses the host, so a VM recreated elsewhere runs twice.

The parts, each in its own module: `model` (Host, Vm, History, datastores, constants, LabError), `state` (the data
and the primitive changes everything goes through), `lifecycle` (transition plans, the action and recover handlers),
`monitor` (host silence, VM probe, state guard), `scheduler` (placement in the fast profile) and `faults` (what a
`lab.*` failure does to the truth). `Cloud` is the façade: it owns the lock and the clock, composes the parts in
`tick()` and the public calls, and judges the truth (`oracle`).

Every state change is appended to the timeline and handed to the event sink (the ZeroMQ publisher), with the object's
XML rendered under the lock so the event carries the state of that moment.

Measured at 1,000 hosts / 20,000 RUNNING VMs in 4 clusters (`oneha lab sim --hosts 1000 --vms 20000 --clusters 4`,
Python 3.11, x86-64, 2 cores): the process is ready in ~0.3 s with an RSS of ~64 MB; after serving one.hostpool.info
and a whole-pool one.vmpool.info (XML caches warm) the RSS is ~110 MB (peak ~130 MB). one.hostpool.info (1.5 MB body)
answers in ~115 ms cold and ~80 ms warm over loopback (~240 ms including pyone's parse); one.vmpool.info of all
20,000 VMs takes ~1.2 s. tests/test_lab_scale.py prints these timings on every run (pytest -s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from oneha.lab import faults, lifecycle, monitor, scheduler
from oneha.lab.model import (
    ACT_LIVE_MIGRATE,
    ACT_MIGRATE,
    ACT_MONITOR,
    ACT_NONE,
    NOT_MEANT_TO_RUN,
    POWER_OFF,
    POWER_PARTITIONED,
    Datastore,
    Host,
    L,
    LabError,
    Vm,
    capacity_error,
    fits,
    state_str,
)
from oneha.lab.state import CloudState
from oneha.opennebula import ErrorCode, HostState, RecoverOp, VmState


class Cloud(CloudState):
    """The thread-safe model. Public methods take the lock; `_`-methods expect it held."""

    def __init__(self, monitoring_interval_s: float = 2.0, step_delay_s: float = 0.2, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, missing_state: str = "POWEROFF",
                 state_guard_s: float | None = None) -> None:
        super().__init__(monitoring_interval_s, step_delay_s, seed, clock, missing_state, state_guard_s)
        self.lock = threading.RLock()

    # ---------------------------------------------------------------------------------------------------------
    # Building

    def add_cluster(self, cluster_id: int, shared: bool) -> None:
        with self.lock:
            ds_id = 0 if cluster_id == 0 else 100 + cluster_id
            tm = "shared" if shared else "ssh"
            self.datastores[ds_id] = Datastore(ds_id, "system" if ds_id == 0 else f"system-c{cluster_id}", 1,
                                               shared, [cluster_id], tm)
            self.cluster_ds[cluster_id] = ds_id
            if 1 not in self.datastores:
                self.datastores[1] = Datastore(1, "default", 0, True, [0], "shared")
                self.datastores[2] = Datastore(2, "files", 2, True, [0], "ssh")
            else:
                self.datastores[1].cluster_ids.append(cluster_id)

    def add_host(self, cluster_id: int, capacity: int = 32, name: str | None = None) -> int:
        with self.lock:
            hid = len(self.hosts)
            name = name or f"host{hid:04d}"
            template = {"HOSTNAME": name, "HYPERVISOR": "kvm", "FENCE_IP": f"10.1.{hid // 250}.{hid % 250 + 1}",
                        "ARCH": "x86_64", "RESERVED_CPU": "", "RESERVED_MEM": ""}
            self.hosts[hid] = Host(hid, name, cluster_id, "default" if cluster_id == 0 else f"cluster{cluster_id}",
                                   capacity, template=template)
            self._record("host", hid, "MONITORED", emit=False)
            return hid

    def create_vm(self, spec: dict[str, Any], emit: bool = True) -> int:
        """`lab.vm.create`: a VM placed directly in STATE on HOST (or PENDING for the scheduler)."""
        with self.lock:
            state = str(spec.get("STATE", "RUNNING")).upper()
            if state not in ("RUNNING", "SUSPENDED", "POWEROFF", "PENDING", "HOLD"):
                raise LabError(ErrorCode.XML_RPC_API, f"STATE must be RUNNING, SUSPENDED, POWEROFF, PENDING or "
                                                      f"HOLD, not {state}")
            vid = self.next_vm_id
            self.next_vm_id += 1
            user = {"HA": str(spec["HA"])} if "HA" in spec else {}
            if "HA_PRIORITY" in spec:
                user["HA_PRIORITY"] = str(spec["HA_PRIORITY"])
            for key, value in (spec.get("USER_TEMPLATE") or {}).items():
                user[str(key)] = str(value)
            vm = Vm(vid, str(spec.get("NAME") or f"vm{vid}"), VmState.PENDING, L("LCM_INIT"), int(time.time()),
                    user, {"CPU": "1", "MEMORY": "512", "VCPU": "1", "VMID": str(vid)})
            _template_from_spec(vm, spec)
            self.vms[vid] = vm
            if state in ("PENDING", "HOLD"):
                self._set(vm, VmState[state], L("LCM_INIT"), emit)
                if state == "PENDING":
                    self.pending.add(vid)
                return vid
            host = scheduler.place_for(self, vm, spec.get("HOST"))
            self._open_history(vm, host, ACT_NONE)
            if state == "RUNNING":
                self.running[vid] = {host.id} if host.power != POWER_OFF else set()
                vm.running_since = self.clock()
                self._set(vm, VmState.ACTIVE, L("RUNNING"), emit)
            else:
                self._set(vm, VmState[state], L("LCM_INIT"), emit)
            return vid

    # ---------------------------------------------------------------------------------------------------------
    # Time

    def tick(self) -> None:
        with self.lock:
            now = self.clock()
            if self.timing is None:
                monitor.monitor(self, now)
            if self.vanished:
                monitor.probe_vms(self, now)
            for vid in sorted(self.busy):
                vm = self.vms[vid]
                if vm.plan and now >= vm.next_at:
                    lifecycle.advance(self, vm, now)
            if self.timing is not None:  # issue 12: monitord, scheduler and plan manager on their own timers
                self.timing.tick(now)
            elif self.pending:
                scheduler.schedule(self)

    # ---------------------------------------------------------------------------------------------------------
    # XML-RPC actions (oned's state rules, `src/rm/RequestManagerVirtualMachine.cc`, `src/lcm/LifeCycleActions.cc`)

    def vm_action(self, action: str, vid: int) -> None:
        with self.lock:
            vm = self.get_vm(vid)
            handler = lifecycle.ACTIONS.get(action)
            if handler is None:
                # oned answers an unknown action name with ACTION (RequestManagerVirtualMachine.cc)
                raise LabError(ErrorCode.ACTION, f"Virtual machine action \"{action}\" is not supported", vid)
            if not handler(self, vm):
                raise LabError(ErrorCode.ACTION, f"Error performing action \"{action}\": This action is not "
                                                 f"available for state {vm.state_name().replace('/', ' ')}", vid)

    def vm_recover(self, vid: int, op: int) -> None:
        with self.lock:
            vm = self.get_vm(vid)
            try:
                rop = RecoverOp(op)
            except ValueError:
                raise LabError(ErrorCode.ACTION, "Wrong recovery operation code", vid) from None  # as oned
            refused = lifecycle.RECOVER[rop](self, vm)
            if refused is not None:
                raise LabError(ErrorCode.ACTION, refused, vid)

    def vm_migrate(self, vid: int, hid: int, live: bool) -> None:
        with self.lock:
            vm = self.get_vm(vid)
            host = self.get_host(hid)
            ok = (vm.state in (VmState.POWEROFF, VmState.SUSPENDED) and not vm.plan) or (
                vm.state == VmState.ACTIVE and vm.lcm in (L("RUNNING"), L("UNKNOWN")) and not vm.plan)
            if not ok:
                raise LabError(ErrorCode.ACTION, "Error performing action \"migrate\": This action is not "
                                                 f"available for state {vm.state_name()}", vid)
            if vm.hid == hid:
                raise LabError(ErrorCode.ACTION, "VM is already running on host", vid)
            _usable_target(host, vid)
            lifecycle.migrate_to(self, vm, host, live=live and vm.lcm == L("RUNNING"),
                             action=ACT_LIVE_MIGRATE if live else ACT_MIGRATE)

    def vm_deploy(self, vid: int, hid: int, enforce: bool = False, by: str = "api") -> None:
        """`one.vm.deploy` (`VirtualMachineAPI::deploy`, src/rm/api/VirtualMachineAPI.cc): from PENDING, HOLD,
        STOPPED or UNDEPLOYED only (:594-602), onto any host but an OFFLINE one (`get_host_information`,
        :4160-4165), with `enforce` a CPU and memory check of the host share (`check_host` :4276-4315,
        `HostShare::test_compute`) — a check, not a reservation: the capacity is only added when the VM is placed,
        so two deploys checked before either is placed can both pass (oned: the LCM thread adds it later). No
        SCHED_REQUIREMENTS or VM-group check (the scheduler's job). Then `DispatchManager::deploy`
        (src/dm/DispatchManagerActions.cc): ACTIVE at once and the LCM's prolog + boot on the driver threads,
        bypassing the scheduler's window and plan. Every deploy is written to the deploy log (`lab.deploys`)."""
        with self.lock:
            try:
                self._deploy(self.get_vm(vid), self.get_host(hid), enforce)
            except LabError as exc:
                self._log_call(by, "deploy", vid, hid, exc.message)
                raise
            self._log_call(by, "deploy", vid, hid, "")

    def _deploy(self, vm: Vm, host: Host, enforce: bool) -> None:
        # The order and the wording of a real oned 7.4 (seen): an OFFLINE host first, then the VM's state (by
        # `state_str`: the LCM state of an ACTIVE VM), then the capacity (`VirtualMachineAPI.cc`, `HostShare.cc`).
        _usable_target(host, vm.id)
        if vm.state not in (VmState.PENDING, VmState.HOLD, VmState.STOPPED, VmState.UNDEPLOYED):
            raise LabError(ErrorCode.ACTION, f"Deploy action is not available for state {state_str(vm)}", vm.id)
        if enforce and not fits(host, vm):
            raise LabError(ErrorCode.ACTION, f"virtual machine [{vm.id}] does not fit in host [{host.id}]. "
                           f"{capacity_error(host, vm)}", vm.id)
        self.pending.discard(vm.id)
        self._open_history(vm, host, ACT_NONE)
        # Any other host state is accepted (ERROR, DISABLED, INIT; MONITORED but dead): the deployment then
        # fails there (`lifecycle.step_failure`: PROLOG_FAILURE).
        self._start_plan(vm, [(VmState.ACTIVE, "PROLOG"), (VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")])

    def calls_since(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["t"] >= since]

    def host_status(self, hid: int, status: int) -> None:
        """`one.host.status` as `HostAPI::status` (src/rm/api/HostAPI.cc): the host's state only, no VM touched;
        `Host::enable/disable/offline` (src/host/Host.cc) pick the state, `HostPool::update` publishes the state
        event when it changed, and monitord reacts (`monitor.status_changed`)."""
        with self.lock:
            host = self.get_host(hid)
            if status not in (0, 1, 2):
                raise LabError(ErrorCode.INTERNAL, "Wrong status code", hid)  # HostAPI.cc: any other code
            if self.host_status_ignore > 0:
                self.host_status_ignore -= 1
                return  # lab.faults host_status_ignore: answered SUCCESS, nothing written
            old = host.state
            if status == 0:
                # `Host::enable`: MONITORED only from DISABLED with a known capacity (total_cpu > 0); from OFFLINE
                # (capacity wiped), ERROR, INIT or MONITORED it is INIT, MONITORED again after a successful monitor.
                target = HostState.MONITORED if old == HostState.DISABLED and not host.wiped else HostState.INIT
            elif status == 1:
                target = HostState.DISABLED
            else:
                target = HostState.OFFLINE
                host.wiped = True  # `Host::offline`: `reset_capacity`, even if it was OFFLINE already
                self._touch_host(host)
            if target != old:
                self._set_host(host, target)
                monitor.status_changed(self, host, old)

    # ---------------------------------------------------------------------------------------------------------
    # Fault injection

    def host_kill(self, hid: int) -> None:
        """Power lost: the host and its domains are gone."""
        with self.lock:
            host = self.get_host(hid)
            faults.power(self, host, POWER_OFF)

    def host_partition(self, hid: int) -> None:
        """The front-end loses the host; its domains keep running."""
        with self.lock:
            faults.power(self, self.get_host(hid), POWER_PARTITIONED)

    def host_fence(self, hid: int) -> None:
        """What a fence command does: power off (domains stop), whatever the front-end can see."""
        with self.lock:
            faults.power(self, self.get_host(hid), POWER_OFF)

    def host_revive(self, hid: int) -> None:
        """Powered on / reconnected: monitoring hears from it on the next tick."""
        with self.lock:
            faults.revive(self.get_host(hid))

    def vm_crash(self, vid: int, reason: str = "missing") -> None:
        """The domain stops behind oned's back (`faults.crash`)."""
        with self.lock:
            faults.crash(self, self.get_vm(vid), reason)

    def vm_fail(self, vid: int, lcm_name: str, sticky: bool) -> None:
        """The VM lands in a failure LCM state now; sticky: every later pass through that stage fails too."""
        with self.lock:
            faults.fail(self, self.get_vm(vid), lcm_name, sticky)

    # ---------------------------------------------------------------------------------------------------------
    # The oracle

    def oracle(self, since: float = 0.0) -> dict[str, Any]:
        """Where VMs really run, and what is wrong with that.

        - running: vm id (str) -> sorted host ids where its domain really runs (VMs running nowhere are omitted).
        - duplicates: VMs whose domain runs on two or more hosts at once (split brain; must never happen).
        - lost: VMs that should run but run nowhere and are not on their way. "Should run" = not DONE, POWEROFF,
          SUSPENDED, STOPPED, UNDEPLOYED or HOLD in oned's view (those are stopped by intent), except a POWEROFF
          that nobody asked for (history ACTION = MONITOR: the monitor found the domain gone), which is lost.
          "On their way" = PENDING, or ACTIVE in a transitional LCM state that ends in RUNNING (PROLOG, BOOT, *MIGRATE*,
          CLEANUP_RESUBMIT, BOOT_*). So a VM in UNKNOWN or in a *_FAILURE state that runs nowhere is lost; a VM
          UNKNOWN on a partitioned host whose domain still runs there is not.
        - timeline: [wall time, "host"|"vm", id, state name] for every change at or after `since`.
        """
        with self.lock:
            running = {str(v): sorted(h) for v, h in self.running.items() if h}
            dups = sorted(v for v, h in self.running.items() if len(h) > 1)
            lost = sorted(vm.id for vm in self.vms.values() if self._is_lost(vm))
            timeline = [[t, k, i, s] for t, k, i, s in self.timeline if t >= since]
        return {"running": running, "duplicates": dups, "lost": lost, "timeline": timeline}

    def _is_lost(self, vm: Vm) -> bool:
        if self.running.get(vm.id) or vm.state == VmState.PENDING:
            return False
        if vm.state == VmState.POWEROFF and vm.history and vm.history[-1].action == ACT_MONITOR:
            return True  # nobody asked for this poweroff: the monitor found the domain gone
        if vm.state in NOT_MEANT_TO_RUN:
            return False
        if vm.state != VmState.ACTIVE:
            return True
        name = vm.lcm.name
        on_the_way = name in ("PROLOG", "BOOT", "CLEANUP_RESUBMIT", "MIGRATE") or (
            "MIGRATE" in name and not name.endswith("FAILURE")) or (
            name.startswith("BOOT_") and not name.endswith("FAILURE"))
        stopping = name in ("SHUTDOWN", "SHUTDOWN_POWEROFF", "SHUTDOWN_UNDEPLOY", "SAVE_STOP", "SAVE_SUSPEND",
                            "EPILOG", "EPILOG_STOP", "EPILOG_UNDEPLOY", "CLEANUP_DELETE")
        return not (on_the_way or stopping)


def _usable_target(host: Host, vid: int) -> None:
    """`one.vm.deploy`/`migrate` refuse only an OFFLINE target (`VirtualMachineAPI.cc`, `get_host_information`)."""
    if host.state == HostState.OFFLINE:
        raise LabError(ErrorCode.ACTION, "Host is offline, cannot use it to deploy VM", vid)

def _template_from_spec(vm: Vm, spec: dict[str, Any]) -> None:
    """`lab.vm.create`'s CPU and MEMORY, and its TEMPLATE struct: scalar attributes, and structs as vector
    attributes (VMGROUP, PCI, TOPOLOGY…), shown in the VM's full and extended bodies."""
    for key in ("CPU", "MEMORY"):
        if key in spec:
            vm.template[key] = str(spec[key])
    for key, value in (spec.get("TEMPLATE") or {}).items():
        if isinstance(value, dict):
            vm.vectors[str(key)] = {str(k): str(v) for k, v in value.items()}
        else:
            vm.template[str(key)] = str(value)
