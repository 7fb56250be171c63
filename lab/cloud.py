"""The lab cloud's model: what oned believes (hosts, VMs, history) and the truth (where each VM really runs).

One lock guards everything. Time moves only in `tick()`, called by one background thread (see `lab.sim`):
transitional VM states advance after `step_delay_s`, the scheduler places PENDING and resched'ed VMs, and
monitoring declares silent hosts ERROR after `monitoring_interval_s` (REFERENCE §3,
`src/monitor/src/monitor/HostMonitorManager.cc`). Request handlers never sleep: they change state and return.

Two views are kept apart on purpose, because oneha's whole job lives in the gap between them:
- oned's view: host STATE, VM STATE/LCM_STATE, history records, HOST/VMS. This is what the XML-RPC API shows.
- the truth: `running[vm_id]` = the set of host ids where the VM's domain really runs. Killing or fencing a host stops
  its domains; a partition keeps them running while oned loses the host, so a VM recreated elsewhere runs twice.

Every state change is appended to the timeline and handed to the event sink (the ZeroMQ publisher), with the object's
XML rendered under the lock so the event carries the state of that moment.

Measured at 1,000 hosts / 20,000 RUNNING VMs in 4 clusters (`oneha lab sim --hosts 1000 --vms 20000 --clusters 4`,
Python 3.11, x86-64, 2 cores): the process is ready in ~0.3 s with an RSS of ~64 MB; after serving one.hostpool.info
and a whole-pool one.vmpool.info (XML caches warm) the RSS is ~110 MB (peak ~130 MB). one.hostpool.info (1.5 MB body)
answers in ~115 ms cold and ~80 ms warm over loopback (~240 ms including pyone's parse); one.vmpool.info of all
20,000 VMs takes ~1.2 s. tests/test_lab_scale.py prints these timings on every run (pytest -s).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oneha.lab import xmlwriter  # xmlwriter names this module's types for mypy only (TYPE_CHECKING)
from oneha.opennebula import ErrorCode, HostState, LcmState, RecoverOp, VmState

if TYPE_CHECKING:
    from oneha.lab.timeline import Timelines


def L(name: str) -> LcmState:
    """The LcmState member for a name."""
    return LcmState[name]


class LabError(Exception):
    """An oned-style failure: the RPC layer turns it into `[False, message, code, id]`."""

    def __init__(self, code: ErrorCode, message: str, obj_id: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.obj_id = obj_id


# Power of a hypervisor as the truth sees it. "partitioned": running, but the front-end cannot reach it.
POWER_ON, POWER_OFF, POWER_PARTITIONED = "on", "off", "partitioned"

# History ACTION numbers (vm.xsd).
ACT_NONE, ACT_MIGRATE, ACT_LIVE_MIGRATE = 0, 1, 2
ACTION_NUMBERS = {
    "terminate": 27, "terminate-hard": 28, "undeploy": 5, "undeploy-hard": 6, "hold": 7, "release": 8, "stop": 9,
    "suspend": 10, "resume": 11, "reboot": 15, "reboot-hard": 16, "resched": 17, "unresched": 18,
    "poweroff": 19, "poweroff-hard": 20, "deploy": 30, "recover-delete": 13, "recover-recreate": 14,
    "monitor": 44,
}
# `include/VMActions.h` MONITOR_ACTION: "internal, monitoring process". `trigger_monitor_poweroff`
# (`src/lcm/LifeCycleStates.cc`) writes it, with uid/gid/req_id -1 (`set_internal_action`), on the history record of a
# VM the monitor found powered off or missing; an operator's poweroff writes 19/20 with the caller's uid instead.
ACT_MONITOR = ACTION_NUMBERS["monitor"]

# How a domain stops behind oned's back (`lab.vm.crash` reason). "missing": it is gone (qemu killed, the guest shut
# itself down: OpenNebula's domains are transient, so a shut-off domain vanishes); the probe reports it after
# `times_missing` polls as the monitor's MISSING_STATE (`src/im_mad/remotes/lib/probe_db.rb`,
# `kvm-probes.d/vm/status/state.rb`: "POWEROFF"). The others are libvirt's states/reasons that
# `src/im_mad/remotes/lib/kvm.rb` maps to FAILURE, which `test_and_trigger` (`src/im/InformationManager.cc`) turns into
# `trigger_monitor_done`: RUNNING -> UNKNOWN.
CRASH_REASONS = ("missing", "crashed", "watchdog", "io-error")
MISSING_STATES = ("POWEROFF", "UNKNOWN")

# Intent: states in which a VM is not supposed to run anywhere (the oracle does not call these "lost").
NOT_MEANT_TO_RUN = frozenset({VmState.DONE, VmState.POWEROFF, VmState.SUSPENDED, VmState.STOPPED,
                              VmState.UNDEPLOYED, VmState.HOLD})


@dataclass(slots=True)
class History:
    seq: int
    hid: int
    hostname: str
    cid: int
    ds_id: int
    stime: int
    etime: int = 0
    action: int = ACT_NONE
    tm_mad: str = "shared"


@dataclass(slots=True)
class Datastore:
    id: int
    name: str
    type: int  # 0 image, 1 system, 2 file
    shared: bool
    cluster_ids: list[int]
    tm_mad: str


@dataclass(slots=True)
class Host:
    id: int
    name: str
    cluster_id: int
    cluster: str
    capacity: int
    state: HostState = HostState.MONITORED
    prev_state: HostState = HostState.MONITORED
    template: dict[str, str] = field(default_factory=dict)
    power: str = POWER_ON
    vm_ids: set[int] = field(default_factory=set)  # oned's HOST/VMS
    silent_since: float | None = None  # monotonic time the front-end last heard from it, when it stopped answering
    lost: bool = False  # monitoring has given up on it (its RUNNING VMs were set UNKNOWN)
    xml_cache: str | None = None


@dataclass(slots=True)
class Step:
    """One pending transition: after `step_delay_s` the VM enters (state, lcm)."""

    state: VmState
    lcm: Any


@dataclass(slots=True)
class Vm:
    id: int
    name: str
    state: VmState
    lcm: Any
    stime: int
    user_template: dict[str, str]
    template: dict[str, str]
    prev_state: VmState = VmState.INIT
    prev_lcm: Any = None
    resched: bool = False
    etime: int = 0
    history: list[History] = field(default_factory=list)
    plan: list[Step] = field(default_factory=list)
    next_at: float = 0.0
    sticky_fail: Any = None  # an LcmState *_FAILURE every later pass through its stage ends in
    running_since: float = 0.0  # clock() when it last entered RUNNING (history RSTIME: the monitor's guard)
    xml_full: str | None = None
    xml_short: str | None = None
    xml_pool_ext: str | None = None

    @property
    def hid(self) -> int | None:
        return self.history[-1].hid if self.history else None

    def state_name(self) -> str:
        return f"ACTIVE/{self.lcm.name}" if self.state == VmState.ACTIVE else self.state.name


# (kind, id, state name, lcm name or None, remote host name or None, object xml, OneFlow SERVICE_ID or None)
EventSink = Callable[[str, int, str, str | None, str | None, str, str | None], None]

FAILURE_OF_STAGE = {  # when a step out of this LCM state fails (host unreachable or sticky fail), it lands here
    "PROLOG": "PROLOG_FAILURE", "BOOT": "BOOT_FAILURE", "PROLOG_MIGRATE": "PROLOG_MIGRATE_FAILURE",
    "BOOT_MIGRATE": "BOOT_MIGRATE_FAILURE", "PROLOG_MIGRATE_UNKNOWN": "PROLOG_MIGRATE_UNKNOWN_FAILURE",
    "EPILOG": "EPILOG_FAILURE", "EPILOG_STOP": "EPILOG_STOP_FAILURE", "PROLOG_RESUME": "PROLOG_RESUME_FAILURE",
    "BOOT_STOPPED": "BOOT_STOPPED_FAILURE", "BOOT_UNDEPLOY": "BOOT_UNDEPLOY_FAILURE",
    "PROLOG_UNDEPLOY": "PROLOG_UNDEPLOY_FAILURE", "EPILOG_UNDEPLOY": "EPILOG_UNDEPLOY_FAILURE",
}
STAGE_OF_FAILURE = {v: k for k, v in FAILURE_OF_STAGE.items()}
# A boot that fails on an unreachable host and where oned puts the VM (`trigger_deploy_failure`, LifeCycleStates.cc).
BOOT_FALLBACK = {"BOOT_UNKNOWN": "UNKNOWN", "BOOT_POWEROFF": "POWEROFF", "BOOT_SUSPENDED": "SUSPENDED"}
# Failure state -> the stage `recover 2` (retry) re-runs and the step `recover 1` (success) jumps to.
RETRY_STAGE = STAGE_OF_FAILURE | {"PROLOG_MIGRATE_POWEROFF_FAILURE": "PROLOG_MIGRATE_POWEROFF",
                                  "PROLOG_MIGRATE_SUSPEND_FAILURE": "PROLOG_MIGRATE_SUSPEND"}


class Cloud:
    """The thread-safe model. Public methods take the lock; `_`-methods expect it held."""

    def __init__(self, monitoring_interval_s: float = 2.0, step_delay_s: float = 0.2, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, missing_state: str = "POWEROFF",
                 state_guard_s: float | None = None) -> None:
        if missing_state not in MISSING_STATES:
            raise ValueError(f"missing_state must be one of {MISSING_STATES}, not {missing_state!r}")
        self.lock = threading.RLock()
        self.monitoring_interval_s = monitoring_interval_s
        # The VM monitor's MISSING_STATE (probe_db.rb; "POWEROFF" unless the cloud configured "UNKNOWN").
        self.missing_state = missing_state
        # oned ignores a VM's reported state for 30 s after it started or stopped running (`test_and_trigger`,
        # `src/im/InformationManager.cc`: RSTIME/RETIME). The lab scales it with its monitoring interval, as it
        # scales everything else (30 s against a real host-failure detection of about a minute).
        self.state_guard_s = monitoring_interval_s if state_guard_s is None else state_guard_s
        self.lcm_ignore = 0  # see _lcm_ignored
        self.lcm_ignored = 0
        self.vanished: dict[int, tuple[str, float, int]] = {}  # vm id -> (reason, when, host id): not seen yet
        self.step_delay_s = step_delay_s
        self.clock = clock
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self.hosts: dict[int, Host] = {}
        self.vms: dict[int, Vm] = {}
        self.datastores: dict[int, Datastore] = {}
        self.cluster_ds: dict[int, int] = {}  # cluster id -> its system datastore id
        self.running: dict[int, set[int]] = {}  # THE TRUTH: vm id -> host ids where it really runs
        self.busy: set[int] = set()  # VMs with a non-empty plan (so tick() does not scan 20,000 VMs)
        self.pending: set[int] = set()  # PENDING VMs and resched'ed VMs, for the scheduler
        self.timeline: list[tuple[float, str, int, str]] = []
        self.timing: Timelines | None = None  # issue 12: oned's own timelines (lab/timeline.py); None = immediate
        self.sink: EventSink | None = None
        self.next_vm_id = 0
        self.pool_dirty = True
        self.rendered_version = 0  # bumps on any change, so the rpc layer can cache whole pool bodies
        self.xml = xmlwriter

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
            self.vms[vid] = vm
            if state in ("PENDING", "HOLD"):
                self._set(vm, VmState[state], L("LCM_INIT"), emit)
                if state == "PENDING":
                    self.pending.add(vid)
                return vid
            host = self._place_for(vm, spec.get("HOST"))
            self._open_history(vm, host, ACT_NONE)
            if state == "RUNNING":
                self.running[vid] = {host.id} if host.power != POWER_OFF else set()
                vm.running_since = self.clock()
                self._set(vm, VmState.ACTIVE, L("RUNNING"), emit)
            else:
                self._set(vm, VmState[state], L("LCM_INIT"), emit)
            return vid

    def _place_for(self, vm: Vm, pinned: Any) -> Host:
        if pinned is not None and str(pinned) != "":
            host = self.hosts.get(_as_int(pinned, "HOST"))
            if host is None:
                raise LabError(ErrorCode.NO_EXISTS, f"Error getting host [{pinned}].", _as_int(pinned, "HOST"))
            return host
        host = self._choose_host(vm, exclude=None, cluster=None)
        if host is None:
            raise LabError(ErrorCode.ACTION, "No host with enough capacity to create the VM")
        return host

    # ---------------------------------------------------------------------------------------------------------
    # Read access for the XML-RPC layer

    def get_host(self, hid: int) -> Host:
        host = self.hosts.get(hid)
        if host is None:
            raise LabError(ErrorCode.NO_EXISTS, f"Error getting host [{hid}].", hid)
        return host

    def get_vm(self, vid: int) -> Vm:
        vm = self.vms.get(vid)
        if vm is None:
            raise LabError(ErrorCode.NO_EXISTS, f"Error getting virtual machine [{vid}].", vid)
        return vm

    # ---------------------------------------------------------------------------------------------------------
    # Changing state: every change goes through _set / _set_host so the timeline and the events never miss one.

    def _set(self, vm: Vm, state: VmState, lcm: Any, emit: bool = True) -> None:
        if vm.state != state or vm.lcm != lcm:
            vm.prev_state, vm.prev_lcm = vm.state, vm.lcm
        vm.state, vm.lcm = state, lcm
        if state == VmState.DONE:
            vm.etime = int(time.time())
        self._touch_vm(vm)
        lcm_name = lcm.name if state == VmState.ACTIVE else "LCM_INIT"
        self._record("vm", vm.id, vm.state_name(), emit=False)
        if emit and self.sink is not None:
            hostname = vm.history[-1].hostname if vm.history else None
            self.sink("VM", vm.id, state.name, lcm_name, hostname, self.xml.vm_xml(self, vm, full=True),
                      vm.user_template.get("SERVICE_ID") or None)

    def _set_host(self, host: Host, state: HostState) -> None:
        host.prev_state, host.state = host.state, state
        self._touch_host(host)
        self._record("host", host.id, state.name, emit=False)
        if self.sink is not None:
            self.sink("HOST", host.id, state.name, None, host.name, self.xml.host_xml(self, host), None)

    def _record(self, kind: str, oid: int, name: str, emit: bool) -> None:
        self.timeline.append((time.time(), kind, oid, name))

    def _touch_vm(self, vm: Vm) -> None:
        vm.xml_full = vm.xml_short = vm.xml_pool_ext = None
        self.rendered_version += 1

    def _touch_host(self, host: Host) -> None:
        host.xml_cache = None
        self.rendered_version += 1

    def _open_history(self, vm: Vm, host: Host, action: int) -> None:
        now = int(time.time())
        self._close_history(vm, action)
        ds_id = self.cluster_ds.get(host.cluster_id, 0)
        tm_mad = self.datastores[ds_id].tm_mad if ds_id in self.datastores else "shared"
        # The VM template keeps the system datastore's TM (`TM_MAD_SYSTEM`, vm.xsd requires it) and the scheduler's
        # cluster constraint (`VirtualMachine::automatic_requirements`, src/vm/VirtualMachine.cc).
        vm.template["TM_MAD_SYSTEM"] = tm_mad
        vm.template["AUTOMATIC_REQUIREMENTS"] = f"(CLUSTER_ID = {host.cluster_id}) & !(PUBLIC_CLOUD = YES) & " \
                                                "!(PIN_POLICY = PINNED)"
        vm.history.append(History(len(vm.history), host.id, host.name, host.cluster_id, ds_id, now, tm_mad=tm_mad))
        host.vm_ids.add(vm.id)
        self._touch_host(host)
        self._touch_vm(vm)

    def _close_history(self, vm: Vm, action: int) -> None:
        if vm.history and vm.history[-1].etime == 0:
            rec = vm.history[-1]
            rec.etime = int(time.time())
            rec.action = action
            self._touch_vm(vm)
        self._leave_host(vm)

    def _close_history_action(self, vm: Vm, action: str) -> None:
        """Record the action that ends the current history record (oned writes it when the action starts)."""
        if vm.history:
            vm.history[-1].action = ACTION_NUMBERS[action]
            self._touch_vm(vm)

    def _leave_host(self, vm: Vm) -> None:
        if vm.history:
            host = self.hosts.get(vm.history[-1].hid)
            if host is not None and vm.id in host.vm_ids:
                host.vm_ids.discard(vm.id)
                self._touch_host(host)

    def _start_plan(self, vm: Vm, steps: Iterable[tuple[VmState, str]], first_now: bool = True) -> None:
        """Enter the first step now (if first_now) and queue the rest, one per step delay."""
        plan = [Step(s, L(lcm)) for s, lcm in steps]
        if first_now and plan:
            first = plan.pop(0)
            self._set(vm, first.state, first.lcm)
        vm.plan = plan
        vm.next_at = self.clock() + self._step_s(vm, self.clock())
        if plan:
            self.busy.add(vm.id)
        else:
            self.busy.discard(vm.id)

    # ---------------------------------------------------------------------------------------------------------
    # Truth

    def _really_stop(self, vm: Vm, only_reachable: bool = True) -> None:
        """The driver stops the domain on its current host; an unreachable (off or partitioned) host keeps it."""
        hid = vm.hid
        if hid is None:
            return
        host = self.hosts[hid]
        if only_reachable and host.power == POWER_PARTITIONED:
            return
        self.running.get(vm.id, set()).discard(hid)

    def _really_start(self, vm: Vm) -> None:
        hid = vm.hid
        vm.running_since = self.clock()
        self.vanished.pop(vm.id, None)
        if hid is not None and self.hosts[hid].power != POWER_OFF:
            self.running.setdefault(vm.id, set()).add(hid)

    # ---------------------------------------------------------------------------------------------------------
    # Time

    def tick(self) -> None:
        with self.lock:
            now = self.clock()
            if self.timing is None:
                self._monitor(now)
            if self.vanished:
                self._probe_vms(now)
            for vid in sorted(self.busy):
                vm = self.vms[vid]
                if vm.plan and now >= vm.next_at:
                    self._advance(vm, now)
            if self.timing is not None:  # issue 12: monitord, scheduler and plan manager on their own timers
                self.timing.tick(now)
            elif self.pending:
                self._schedule()

    def _step_s(self, vm: Vm, now: float) -> float:
        """How long the state the VM has just entered lasts (issue 12: per driver operation when timed)."""
        return self.step_delay_s if self.timing is None else self.timing.step_s(vm, now)

    def _advance(self, vm: Vm, now: float) -> None:
        step = vm.plan.pop(0)
        failure = self._step_failure(vm)
        if failure is not None:
            vm.plan.clear()
            self.busy.discard(vm.id)
            if failure in ("POWEROFF", "SUSPENDED"):
                self._set(vm, VmState[failure], L("LCM_INIT"))
            else:
                self._set(vm, VmState.ACTIVE, L(failure))
            return
        self._on_enter(vm, step)
        self._set(vm, step.state, step.lcm)
        vm.next_at = now + self._step_s(vm, now)
        if not vm.plan:
            self.busy.discard(vm.id)

    def _step_failure(self, vm: Vm) -> str | None:
        """A step out of a driver stage fails if the host is unreachable, or if a sticky failure targets it."""
        if vm.state != VmState.ACTIVE:
            return None
        stage = vm.lcm.name
        if vm.sticky_fail is not None and STAGE_OF_FAILURE.get(vm.sticky_fail.name) == stage:
            return str(vm.sticky_fail.name)
        host = self.hosts.get(vm.hid) if vm.hid is not None else None
        if host is not None and host.power != POWER_ON and stage in FAILURE_OF_STAGE:
            return FAILURE_OF_STAGE[stage]
        if host is not None and host.power != POWER_ON and stage in BOOT_FALLBACK:
            return BOOT_FALLBACK[stage]  # `trigger_deploy_failure` (LifeCycleStates.cc): back where it came from
        return None

    def _on_enter(self, vm: Vm, step: Step) -> None:
        """Truth and bookkeeping side effects of entering a state."""
        name = step.lcm.name if step.state == VmState.ACTIVE else step.state.name
        if name == "RUNNING":
            self._really_start(vm)
        elif step.state == VmState.PENDING:
            self._close_history(vm, ACTION_NUMBERS["recover-recreate"])
            self.pending.add(vm.id)
        elif step.state in (VmState.DONE, VmState.STOPPED, VmState.UNDEPLOYED):
            self._close_history(vm, vm.history[-1].action if vm.history else ACT_NONE)

    def _monitor(self, now: float) -> None:
        for host in self.hosts.values():
            if host.power == POWER_ON:
                if host.lost:
                    self._host_answers(host)
                continue
            if host.lost or host.silent_since is None or now - host.silent_since < self.monitoring_interval_s:
                continue
            self._host_silent(host)

    def _host_silent(self, host: Host) -> None:
        """monitord gave up: ERROR first (not for DISABLED/OFFLINE, REFERENCE §1), then RUNNING VMs go UNKNOWN."""
        host.lost = True
        # `Host::error` (src/host/Host.cc): the template's ERROR says when and why (monitord gives no message for
        # a silent host, `HostMonitorManager.cc`), and the state becomes ERROR unless DISABLED/OFFLINE.
        host.template["ERROR"] = f"{time.ctime()} : Error monitoring Host {host.name} ({host.id}): "
        self._touch_host(host)
        if host.state not in (HostState.DISABLED, HostState.OFFLINE):
            self._set_host(host, HostState.ERROR)
        for vid in sorted(host.vm_ids):
            vm = self.vms[vid]
            if vm.state == VmState.ACTIVE and vm.lcm == L("RUNNING"):
                vm.resched = False  # `trigger_monitor_done` (LifeCycleStates.cc) clears RESCHED
                self.pending.discard(vid)
                self._set(vm, VmState.ACTIVE, L("UNKNOWN"))

    def _host_answers(self, host: Host) -> None:
        """Heard from again: MONITORED, and its UNKNOWN VMs RUNNING if really there; a missing domain is reported
        as the MISSING_STATE by the VM probe (`_probe_vms`)."""
        host.lost = False
        host.silent_since = None
        if host.template.pop("ERROR", None) is not None:  # `Host::update_info` clears it on the next report
            self._touch_host(host)
        if host.state == HostState.ERROR:
            self._set_host(host, HostState.MONITORED)
        for vid in sorted(host.vm_ids):
            vm = self.vms[vid]
            if vm.state == VmState.ACTIVE and vm.lcm == L("UNKNOWN") and not vm.plan:
                if host.id in self.running.get(vid, ()):
                    self._set(vm, VmState.ACTIVE, L("RUNNING"))  # `trigger_monitor_poweron`
                elif vid not in self.vanished:
                    self.vanished[vid] = ("missing", self.clock(), host.id)

    def _probe_vms(self, now: float) -> None:
        """What the VM state probe reports about domains that stopped behind oned's back, and what oned does.

        One report per monitoring interval; ignored while the VM is within the state guard of its RUNNING start
        (`test_and_trigger`). A report from a host the front-end cannot hear does not arrive."""
        for vid, (reason, since, hid) in sorted(self.vanished.items()):
            vm = self.vms[vid]
            if vm.hid != hid or vm.plan or not (vm.state == VmState.ACTIVE and vm.lcm in (L("RUNNING"), L("UNKNOWN"))):
                del self.vanished[vid]  # moved, acted on or already stopped: the report changes nothing
                continue
            host = self.hosts[hid]
            if host.power != POWER_ON or host.lost or now - since < self.monitoring_interval_s:
                continue
            if now - vm.running_since < self.state_guard_s:
                continue  # "Ignoring VM state update"
            del self.vanished[vid]
            reported = self.missing_state if reason == "missing" else "FAILURE"
            if reported == "POWEROFF":
                self._monitor_poweroff(vm)
            elif vm.lcm == L("RUNNING"):
                self._set(vm, VmState.ACTIVE, L("UNKNOWN"))  # `trigger_monitor_done` (only from RUNNING)

    def _monitor_poweroff(self, vm: Vm) -> None:
        """`trigger_monitor_poweroff` + `trigger_poweroff_success`: SHUTDOWN_POWEROFF, then POWEROFF, RESCHED
        cleared, the history record's ACTION set to MONITOR (44) with no user."""
        vm.resched = False
        self.pending.discard(vm.id)
        if vm.history:
            vm.history[-1].action = ACT_MONITOR
        self._set(vm, VmState.ACTIVE, L("SHUTDOWN_POWEROFF"))
        self._set(vm, VmState.POWEROFF, L("LCM_INIT"))

    # ---------------------------------------------------------------------------------------------------------
    # Scheduler (mm_sched): PENDING VMs get a host; resched'ed VMs get migrated. At most 200 dispatches a tick.

    def _schedule(self) -> None:
        for vid in sorted(self.pending)[:200]:
            vm = self.vms[vid]
            if vm.state == VmState.PENDING:
                self._dispatch(vm)
            elif vm.resched and not vm.plan:
                self._dispatch_resched(vm)
            else:
                self.pending.discard(vid)

    def _dispatch(self, vm: Vm) -> None:
        prefer = self.hosts[vm.hid].cluster_id if vm.hid is not None else None
        host = self._choose_host(vm, exclude=None, cluster=prefer, strict=False)
        if host is None:
            return
        self.pending.discard(vm.id)
        self._open_history(vm, host, ACT_NONE)
        self._start_plan(vm, [(VmState.ACTIVE, "PROLOG"), (VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")])

    def _dispatch_resched(self, vm: Vm) -> None:
        old = self.hosts[vm.hid] if vm.hid is not None else None
        cluster = old.cluster_id if old is not None else None
        host = self._choose_host(vm, exclude=vm.hid, cluster=cluster, strict=True)
        if host is None:
            return
        self.pending.discard(vm.id)
        vm.resched = False
        self._migrate_to(vm, host, live=False, action=ACT_MIGRATE)  # the scheduler's migrate: history says MIGRATE

    def _choose_host(self, vm: Vm, exclude: int | None, cluster: int | None, strict: bool = False) -> Host | None:
        """Least-loaded MONITORED host with room; same cluster preferred (required when strict)."""
        best: Host | None = None
        best_key: tuple[int, int, int] | None = None
        for host in self.hosts.values():
            if host.state != HostState.MONITORED or host.id == exclude or len(host.vm_ids) >= host.capacity:
                continue
            if strict and host.cluster_id != cluster:
                continue  # resched keeps the VM on its system datastore, i.e. in its cluster
            # No look at host.power: like mm_sched, the lab may pick a host that died but is not ERROR yet;
            # the deployment then fails there (PROLOG_FAILURE), as it would on oned.
            key = (0 if cluster is None or host.cluster_id == cluster else 1, len(host.vm_ids), host.id)
            if best_key is None or key < best_key:
                best, best_key = host, key
        return best

    def _migrate_to(self, vm: Vm, host: Host, live: bool, action: int) -> None:
        """Move a VM (RUNNING, UNKNOWN, POWEROFF or SUSPENDED) to `host` with a new history record."""
        src = self.hosts[vm.hid] if vm.hid is not None else None
        shared = src is not None and self.datastores[self.cluster_ds[src.cluster_id]].shared
        from_lcm = vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name
        if from_lcm == "RUNNING" and live:
            self._set(vm, VmState.ACTIVE, L("MIGRATE"))
            self._really_stop(vm)
            self._open_history(vm, host, ACT_LIVE_MIGRATE)
            self._start_plan(vm, [(VmState.ACTIVE, "RUNNING")], first_now=False)
            return
        if from_lcm == "RUNNING":
            self._really_stop(vm)  # cold migration: the domain is saved and stopped first
            self._open_history(vm, host, action)
            self._start_plan(vm, [(VmState.ACTIVE, "PROLOG_MIGRATE"), (VmState.ACTIVE, "BOOT"),
                                  (VmState.ACTIVE, "RUNNING")])
        elif from_lcm == "UNKNOWN":
            # The source does not answer: its domain (if any) is left where it is. Disks on a local (ssh) datastore
            # cannot be copied off a dead host, so the prolog fails there (why host_error.rb skips -m on them).
            self._open_history(vm, host, action)
            steps = [(VmState.ACTIVE, "PROLOG_MIGRATE_UNKNOWN")]
            steps += [(VmState.ACTIVE, "BOOT"), (VmState.ACTIVE, "RUNNING")] if shared else \
                [(VmState.ACTIVE, "PROLOG_MIGRATE_UNKNOWN_FAILURE")]
            self._start_plan(vm, steps)
        elif from_lcm in ("POWEROFF", "SUSPENDED"):
            stage = "PROLOG_MIGRATE_POWEROFF" if from_lcm == "POWEROFF" else "PROLOG_MIGRATE_SUSPEND"
            self._open_history(vm, host, action)
            self._start_plan(vm, [(VmState.ACTIVE, stage), (VmState[from_lcm], "LCM_INIT")])

    # ---------------------------------------------------------------------------------------------------------
    # XML-RPC actions (oned's state rules, `src/rm/RequestManagerVirtualMachine.cc`, `src/lcm/LifeCycleActions.cc`)

    def vm_action(self, action: str, vid: int) -> None:
        with self.lock:
            vm = self.get_vm(vid)
            handler = _ACTIONS.get(action)
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
            refused = _RECOVER[rop](self, vm)
            if refused is not None:
                raise LabError(ErrorCode.ACTION, refused, vid)

    def _lcm_ignored(self) -> bool:
        """`lab.faults` lcm_ignore: the DM accepted the call, and the LCM, which acts later in oned (a queued
        trigger), finds the VM in a state it does not handle and only logs it. The race oned leaves open between
        the two, made deterministic: the next N such calls succeed and change nothing."""
        if self.lcm_ignore <= 0:
            return False
        self.lcm_ignore -= 1
        self.lcm_ignored += 1
        return True

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
            self._migrate_to(vm, host, live=live and vm.lcm == L("RUNNING"),
                             action=ACT_LIVE_MIGRATE if live else ACT_MIGRATE)

    def vm_deploy(self, vid: int, hid: int) -> None:
        with self.lock:
            vm = self.get_vm(vid)
            host = self.get_host(hid)
            if vm.state not in (VmState.PENDING, VmState.HOLD, VmState.STOPPED, VmState.UNDEPLOYED):
                raise LabError(ErrorCode.ACTION, "Error performing action \"deploy\": This action is not "
                                                 f"available for state {vm.state_name()}", vid)
            self.pending.discard(vid)
            self._open_history(vm, host, ACT_NONE)
            self._start_plan(vm, [(VmState.ACTIVE, "PROLOG"), (VmState.ACTIVE, "BOOT"),
                                  (VmState.ACTIVE, "RUNNING")])

    def host_status(self, hid: int, status: int) -> None:
        with self.lock:
            host = self.get_host(hid)
            target = {0: HostState.MONITORED, 1: HostState.DISABLED, 2: HostState.OFFLINE}.get(status)
            if target is None:
                raise LabError(ErrorCode.XML_RPC_API, f"Wrong status {status}", hid)
            if target == HostState.MONITORED and host.power != POWER_ON:
                # enabling a dead host: oned sets INIT and monitoring then finds it silent
                host.lost = False
                target = HostState.INIT
            if host.state != target:
                self._set_host(host, target)

    # ---------------------------------------------------------------------------------------------------------
    # Fault injection

    def host_kill(self, hid: int) -> None:
        """Power lost: the host and its domains are gone."""
        with self.lock:
            host = self.get_host(hid)
            self._power(host, POWER_OFF)

    def host_partition(self, hid: int) -> None:
        """The front-end loses the host; its domains keep running."""
        with self.lock:
            self._power(self.get_host(hid), POWER_PARTITIONED)

    def host_fence(self, hid: int) -> None:
        """What a fence command does: power off (domains stop), whatever the front-end can see."""
        with self.lock:
            self._power(self.get_host(hid), POWER_OFF)

    def host_revive(self, hid: int) -> None:
        """Powered on / reconnected: monitoring hears from it on the next tick."""
        with self.lock:
            host = self.get_host(hid)
            host.power = POWER_ON
            if host.silent_since is not None and not host.lost:
                host.silent_since = None  # came back before monitoring noticed

    def _power(self, host: Host, power: str) -> None:
        if power == POWER_OFF:
            now = self.clock()
            for vid, hosts in self.running.items():
                if host.id in hosts:
                    hosts.discard(host.id)
                    if self.vms[vid].hid == host.id:  # its domain is gone: the probe will miss it once it answers
                        self.vanished.setdefault(vid, ("missing", now, host.id))
        if host.silent_since is None:
            host.silent_since = self.clock()
        host.power = power

    def vm_crash(self, vid: int, reason: str = "missing") -> None:
        """The domain stops behind oned's back (see CRASH_REASONS); it runs nowhere at once, and oned learns it
        from the VM probe on a later tick: POWEROFF (the default MISSING_STATE) or UNKNOWN."""
        with self.lock:
            vm = self.get_vm(vid)
            if reason not in CRASH_REASONS:
                raise LabError(ErrorCode.XML_RPC_API, f"reason must be one of {', '.join(CRASH_REASONS)}", vid)
            if not (vm.state == VmState.ACTIVE and vm.lcm == L("RUNNING")) or vm.hid is None:
                raise LabError(ErrorCode.ACTION, f"crash needs a RUNNING VM, VM {vid} is {vm.state_name()}", vid)
            self.running.pop(vid, None)
            self.vanished[vid] = (reason, self.clock(), vm.hid)

    def vm_fail(self, vid: int, lcm_name: str, sticky: bool) -> None:
        """The VM lands in a failure LCM state now; sticky: every later pass through that stage fails too."""
        with self.lock:
            vm = self.get_vm(vid)
            name = (lcm_name or "BOOT_FAILURE").upper()
            if not name.endswith("_FAILURE"):
                raise LabError(ErrorCode.XML_RPC_API, f"{name} is not a failure LCM state", vid)
            try:
                target = L(name)
            except KeyError:
                raise LabError(ErrorCode.XML_RPC_API, f"unknown LCM state {name}", vid) from None
            vm.sticky_fail = target if sticky else None
            vm.plan.clear()
            self.busy.discard(vid)
            self.pending.discard(vid)
            self._really_stop(vm, only_reachable=False)
            if vm.hid is None:  # never placed: give it a host so the failure has a history record
                self._open_history(vm, self._place_for(vm, None), ACT_NONE)
            self._set(vm, VmState.ACTIVE, target)

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


def _as_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LabError(ErrorCode.XML_RPC_API, f"{what} must be an integer, got {value!r}") from None


# ------------------------------------------------------------------------------------------------------------
# Action handlers: return False when the action is not allowed in the VM's state (→ ACTION error).

def _is(vm: Vm, *names: str) -> bool:
    if vm.plan:
        return False  # a transition is in progress: oned refuses actions in transient states
    current = vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name
    return current in names


def _terminate(c: Cloud, vm: Vm, hard: bool) -> bool:
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


def _poweroff(c: Cloud, vm: Vm, hard: bool) -> bool:
    if not (_is(vm, "RUNNING") or (hard and _is(vm, "UNKNOWN"))):
        return False
    c._really_stop(vm)
    c._close_history_action(vm, "poweroff-hard" if hard else "poweroff")
    c._start_plan(vm, [(VmState.ACTIVE, "SHUTDOWN_POWEROFF"), (VmState.POWEROFF, "LCM_INIT")])
    return True


def _suspend(c: Cloud, vm: Vm) -> bool:
    if not _is(vm, "RUNNING"):
        return False
    c._really_stop(vm)
    c._start_plan(vm, [(VmState.ACTIVE, "SAVE_SUSPEND"), (VmState.SUSPENDED, "LCM_INIT")])
    return True


def _stop(c: Cloud, vm: Vm) -> bool:
    if _is(vm, "RUNNING"):
        c._really_stop(vm)
        c._start_plan(vm, [(VmState.ACTIVE, "SAVE_STOP"), (VmState.ACTIVE, "EPILOG_STOP"),
                           (VmState.STOPPED, "LCM_INIT")])
        return True
    if _is(vm, "SUSPENDED"):
        c._start_plan(vm, [(VmState.ACTIVE, "EPILOG_STOP"), (VmState.STOPPED, "LCM_INIT")])
        return True
    return False


def _undeploy(c: Cloud, vm: Vm, hard: bool) -> bool:
    if _is(vm, "RUNNING"):
        c._really_stop(vm)
        c._start_plan(vm, [(VmState.ACTIVE, "SHUTDOWN_UNDEPLOY"), (VmState.ACTIVE, "EPILOG_UNDEPLOY"),
                           (VmState.UNDEPLOYED, "LCM_INIT")])
        return True
    if _is(vm, "POWEROFF"):
        c._start_plan(vm, [(VmState.ACTIVE, "EPILOG_UNDEPLOY"), (VmState.UNDEPLOYED, "LCM_INIT")])
        return True
    return False


def _hold(c: Cloud, vm: Vm) -> bool:
    if not _is(vm, "PENDING"):
        return False
    c.pending.discard(vm.id)
    c._set(vm, VmState.HOLD, L("LCM_INIT"))
    return True


def _release(c: Cloud, vm: Vm) -> bool:
    if not _is(vm, "HOLD"):
        return False
    c._set(vm, VmState.PENDING, L("LCM_INIT"))
    c.pending.add(vm.id)
    return True


def _resume(c: Cloud, vm: Vm) -> bool:
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


def _reboot(c: Cloud, vm: Vm) -> bool:
    return _is(vm, "RUNNING")


def _resched(c: Cloud, vm: Vm, on: bool) -> bool:
    if not _is(vm, "RUNNING", "UNKNOWN", "POWEROFF"):
        return False
    if vm.resched != on:
        vm.resched = on
        c._touch_vm(vm)
    (c.pending.add if on else c.pending.discard)(vm.id)
    return True


_ACTIONS: dict[str, Callable[[Cloud, Vm], bool]] = {
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

def _recover_lcm(c: Cloud, vm: Vm, success: bool) -> str | None:
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


def _stage_success(c: Cloud, vm: Vm, stage: str) -> None:
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


def _recover_retry(c: Cloud, vm: Vm) -> str | None:
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


def _recover_delete(c: Cloud, vm: Vm) -> str | None:
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


def _recover_recreate(c: Cloud, vm: Vm) -> str | None:
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


def _clean_up(c: Cloud, vm: Vm, action: str, steps: list[tuple[VmState, str]]) -> None:
    vm.plan.clear()
    c.busy.discard(vm.id)
    c.pending.discard(vm.id)
    vm.resched = False
    c._really_stop(vm)  # the cleanup kills the domain only where the front-end can reach the host
    c._close_history_action(vm, action)
    c._start_plan(vm, steps)


def _recover_delete_db(c: Cloud, vm: Vm) -> str | None:
    if vm.state == VmState.DONE:
        return None
    vm.plan.clear()
    c.busy.discard(vm.id)
    c.pending.discard(vm.id)
    c._close_history(vm, ACTION_NUMBERS["recover-delete"])
    c._set(vm, VmState.DONE, L("LCM_INIT"))  # nothing is cleaned up: a running domain stays (truth untouched)
    return None


_RECOVER: dict[RecoverOp, Callable[[Cloud, Vm], str | None]] = {
    RecoverOp.FAILURE: lambda c, v: _recover_lcm(c, v, False), RecoverOp.SUCCESS: lambda c, v: _recover_lcm(c, v, True),
    RecoverOp.RETRY: _recover_retry, RecoverOp.DELETE: _recover_delete, RecoverOp.DELETE_RECREATE: _recover_recreate,
    RecoverOp.DELETE_DB: _recover_delete_db,
}
