"""The lab cloud's data: hosts, VMs, history records, datastores, and the constants every part of the lab shares.

Plain data and tables only; what changes them lives in `lab.state` (the primitives), `lab.lifecycle`, `lab.monitor`,
`lab.scheduler` and `lab.faults`, composed by `lab.cloud.Cloud`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oneha.opennebula import ErrorCode, HostState, LcmState, VmState


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
    # `Host::offline` (src/host/Host.cc) wipes TOTAL/MAX CPU and MEMORY (`HostShare::reset_capacity`,
    # include/HostShare.h); only a successful monitor report fills them in again.
    wiped: bool = False
    used: tuple[int, int] = (0, 0)  # CPU_USAGE, MEM_USAGE of the VMs in vm_ids (kept with it: `CloudState`)
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
    vectors: dict[str, dict[str, str]] = field(default_factory=dict)  # TEMPLATE vector attributes (VMGROUP, PCI…)
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


# Host share units (`include/HostShareCapacity.h`: cpu = CPU x 100, mem = MEMORY x 1024, in KB). A lab host's
# `capacity` counts VMs of the default size (CPU 1, MEMORY 512 MB).
CPU_PER_SLOT, MEM_KB_PER_SLOT = 100, 512 * 1024


def vm_demand(vm: Vm) -> tuple[int, int]:
    """(cpu, mem KB) the VM takes from a host's share: `VirtualMachine::get_capacity` (src/vm/VirtualMachine.cc)."""
    try:
        cpu = int(float(vm.template.get("CPU") or 1) * 100)
        mem = int(float(vm.template.get("MEMORY") or 512)) * 1024
    except ValueError:
        return CPU_PER_SLOT, MEM_KB_PER_SLOT
    return cpu, mem


def host_max(host: Host) -> tuple[int, int]:
    """MAX_CPU, MAX_MEM; zero once OFFLINE wiped them (`Host::offline`, `HostShare::reset_capacity`)."""
    if host.wiped:
        return 0, 0
    return host.capacity * CPU_PER_SLOT, host.capacity * MEM_KB_PER_SLOT


def fits(host: Host, vm: Vm, planned: tuple[int, int] = (0, 0)) -> bool:
    """`HostShare::test_compute` (src/host/HostShare.cc): MAX - USAGE >= what the VM asks, for CPU and memory."""
    (max_cpu, max_mem), (cpu, mem), (need_cpu, need_mem) = host_max(host), host.used, vm_demand(vm)
    return max_cpu - cpu - planned[0] >= need_cpu and max_mem - mem - planned[1] >= need_mem


def capacity_error(host: Host, vm: Vm) -> str:
    """`HostShare::test_compute`'s reason (src/host/HostShare.cc): CPU first, then memory, as need/free."""
    (max_cpu, max_mem), (cpu, mem), (need_cpu, need_mem) = host_max(host), host.used, vm_demand(vm)
    if max_cpu - cpu < need_cpu:
        return f"Not enough CPU: {need_cpu}/{max_cpu - cpu}"
    return f"Not enough memory: {need_mem}/{max_mem - mem}"


def state_str(vm: Vm) -> str:
    """`VirtualMachine::state_str`: the LCM state's name for an ACTIVE VM, else the VM state's."""
    return vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name


def as_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LabError(ErrorCode.XML_RPC_API, f"{what} must be an integer, got {value!r}") from None
