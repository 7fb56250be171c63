"""The lab cloud's state and the primitive changes every part of the lab goes through (no policy here).

`CloudState` holds oned's view (hosts, VMs, history, datastores), the truth (`running`) and the bookkeeping the parts
share (`busy`, `pending`, `vanished`). Every change of a VM or host state goes through `_set` / `_set_host`, so the
timeline and the events never miss one; `_start_plan` queues a transition plan that `lab.lifecycle.advance` plays.
The lock is the façade's (`lab.cloud.Cloud`): every method here expects it held.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from oneha.lab import xmlwriter  # xmlwriter names the cloud's types for mypy only (TYPE_CHECKING)
from oneha.lab.model import (
    ACTION_NUMBERS,
    MISSING_STATES,
    POWER_OFF,
    POWER_PARTITIONED,
    Datastore,
    EventSink,
    History,
    Host,
    L,
    LabError,
    Step,
    Vm,
    vm_demand,
)
from oneha.opennebula import ErrorCode, HostState, VmState

if TYPE_CHECKING:
    from oneha.lab.timeline import Timelines


class CloudState:
    """The data and its primitives; `_`-methods expect the façade's lock held."""

    def __init__(self, monitoring_interval_s: float = 2.0, step_delay_s: float = 0.2, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, missing_state: str = "POWEROFF",
                 state_guard_s: float | None = None) -> None:
        if missing_state not in MISSING_STATES:
            raise ValueError(f"missing_state must be one of {MISSING_STATES}, not {missing_state!r}")
        self.monitoring_interval_s = monitoring_interval_s
        # The VM monitor's MISSING_STATE (probe_db.rb; "POWEROFF" unless the cloud configured "UNKNOWN").
        self.missing_state = missing_state
        # oned ignores a VM's reported state for 30 s after it started or stopped running (`test_and_trigger`,
        # `src/im/InformationManager.cc`: RSTIME/RETIME). The lab scales it with its monitoring interval, as it
        # scales everything else (30 s against a real host-failure detection of about a minute).
        self.state_guard_s = monitoring_interval_s if state_guard_s is None else state_guard_s
        self.lcm_ignore = 0  # see _lcm_ignored
        self.host_status_ignore = 0  # the next N one.host.status calls succeed and change nothing (lab.faults)
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
        self.calls: deque[dict[str, Any]] = deque(maxlen=100_000)  # the call log of placements (`_log_call`)
        self.timing: Timelines | None = None  # issue 12: oned's own timelines (lab/timeline.py); None = immediate
        self.sink: EventSink | None = None
        self.next_vm_id = 0
        self.pool_dirty = True
        self.rendered_version = 0  # bumps on any change, so the rpc layer can cache whole pool bodies
        self.xml = xmlwriter


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

    def _log_call(self, by: str, what: str, vid: int, hid: int, error: str) -> None:
        """The call log: who placed which VM where ("api": an XML-RPC client such as oneha; "scheduler": the
        lab's own scheduler, in either profile), and oned's error when it refused."""
        self.calls.append({"t": time.time(), "by": by, "call": what, "vm": vid, "host": hid, "error": error})

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
        if vm.id not in host.vm_ids:
            # CPU_USAGE / MEM_USAGE: oned adds a VM's capacity when it is deployed on the host and frees it when it
            # leaves (`add_capacity` / `del_capacity`, src/lcm); a VM's CPU and MEMORY never change in the lab.
            host.used = _plus(host.used, vm_demand(vm), 1)
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
                host.used = _plus(host.used, vm_demand(vm), -1)
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

    def _step_s(self, vm: Vm, now: float) -> float:
        """How long the state the VM has just entered lasts (issue 12: per driver operation when timed)."""
        return self.step_delay_s if self.timing is None else self.timing.step_s(vm, now)

    def _lcm_ignored(self) -> bool:
        """`lab.faults` lcm_ignore: the DM accepted the call, and the LCM, which acts later in oned (a queued
        trigger), finds the VM in a state it does not handle and only logs it. The race oned leaves open between
        the two, made deterministic: the next N such calls succeed and change nothing."""
        if self.lcm_ignore <= 0:
            return False
        self.lcm_ignore -= 1
        self.lcm_ignored += 1
        return True



def _plus(a: tuple[int, int], b: tuple[int, int], sign: int) -> tuple[int, int]:
    return a[0] + sign * b[0], a[1] + sign * b[1]
