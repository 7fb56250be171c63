"""OpenNebula's own timelines for the lab: when monitord gives up on a host, how long driver operations take, and
when the scheduler and the plan manager place PENDING VMs. Issue 12: measure what the user waits for.

A `Profile` holds the settings. `PRODUCTION` carries OpenNebula 7.4's defaults; `FAST` is the lab's immediate model
(`timed=False`: a silent host is ERROR after `monitoring_interval_s`, PENDING VMs are placed on the next lab tick),
which the tests and `./run lab` use so that they stay fast. `PRODUCTION.scaled(f)` keeps oned's logic with every
duration multiplied by f (the tests of this module and `bench_rto --quick`).

Every wait is a due time compared on the lab's clock in `Timelines.tick` (called by the lab's one clock thread with
the cloud's lock held): no thread per host, no sleeps. What happened is kept in `events` (monotonic time, what, id)
so tests and the RTO bench can read the timeline back.

Where each timeline comes from (release-7.4.0):
- Host monitoring: `src/monitor/etc/monitord.conf` (PROBES_PERIOD BEACON_HOST = 30),
  `src/monitor/src/monitor/MonitorConfigTemplate.cc` (MANAGER_TIMER 15), `share/etc/oned.conf`
  (MONITORING_INTERVAL_HOST 180), `src/monitor/src/monitor/HostMonitorManager.cc`: `timer_action` runs every
  MANAGER_TIMER and, for each host whose last message is older than MONITORING_INTERVAL_HOST, calls
  `start_host_monitor` (the IM driver's SSH `start_monitor`); only `start_monitor_failure` sets the host ERROR, and
  oned then sets its RUNNING VMs UNKNOWN in the same step. `src/im_mad/im_exec/one_im_exec.rb` `start_monitor`
  first runs `HostSyncManager#update_remotes` (`src/mad/ruby/HostSyncManager.rb`): one `SSHCommand.run`, no retry
  (IM_MAD's `-r` applies to RemotesCommand only); on a dead host it fails ("Could not update remotes") after one
  SSH failure. Seen on a real oned 7.4 (dummy IM made to fail): one attempt, START_MONITOR failure, VMs UNKNOWN.
- Driver operations: `src/lcm/LifeCycleActions.cc` `clean_up_vm`: `recover 4` of a RUNNING/UNKNOWN VM runs the VMM
  driver's cleanup on the old host before the VM is PENDING (on a dead host: an SSH failure). VM_MAD and TM_MAD run
  at most `-t 15` actions at once (`share/etc/oned.conf`).
- Placement: `src/schedm/SchedulerManager.cc` (`trigger_place`: a window opened by the first PENDING/resched VM is
  sent to the scheduler after SCHED_MAX_WND_TIME or SCHED_MAX_WND_LENGTH VMs; `timer_action` every 5 s, the
  constant in `include/SchedulerManager.h`, also retries pending VMs after SCHED_RETRY_TIME; `place_finished` asks
  again when a placement plan completes), `src/schedm/PlanManager.cc` (`add_plan` drops a new placement plan while
  one is applying; `execute_plan` on every MANAGER_TIMER and when a plan is added: times out actions older than
  ACTION_TIMEOUT, then starts READY actions in order and stops at the first whose host already has
  MAX_ACTIONS_PER_HOST running or when MAX_ACTIONS_PER_CLUSTER run), `src/schedm/Plan.cc` (a finished or timed-out
  action frees its slot; the plan is done when no action is READY or APPLYING), `src/lcm/LifeCycleStates.cc`
  (`action_success` when the deployment ends).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from oneha.lab import lifecycle, monitor
from oneha.lab.model import ACTION_NUMBERS, POWER_ON, LabError, fits, vm_demand
from oneha.opennebula import HostState, VmState

if TYPE_CHECKING:
    from oneha.lab.cloud import Cloud
    from oneha.lab.model import Host, Vm



@dataclass(frozen=True, slots=True)
class Profile:
    """The lab's timing settings. Durations in seconds; counts are plain numbers."""

    name: str
    timed: bool = True  # False: the lab's immediate model (see the module docstring)
    manager_timer_s: float = 15.0  # MANAGER_TIMER: monitord's timer and the plan manager's timer
    beacon_s: float = 30.0  # PROBES_PERIOD/BEACON_HOST: how often a live host's agent reports
    monitoring_interval_s: float = 180.0  # MONITORING_INTERVAL_HOST: silence before start_monitor is retried
    ssh_fail_s: float = 3.0  # one SSH attempt to a dead host (flat network: ARP gives up, "no route to host")
    cleanup_s: float = 1.0  # VMM cleanup on a reachable host
    prolog_shared_s: float = 1.0  # prolog on a shared system datastore (links)
    prolog_copy_s: float = 20.0  # prolog on a local (ssh) system datastore (copies the disks)
    boot_s: float = 3.0  # VMM deploy
    other_step_s: float = 1.0  # any other transitional state
    vmm_threads: int = 15  # VM_MAD `-t 15`
    tm_threads: int = 15  # TM_MAD `-t 15`
    sched_timer_s: float = 5.0  # SchedulerManager's timer_period (a constant)
    sched_max_wnd_time_s: float = 10.0  # SCHED_MAX_WND_TIME
    sched_max_wnd_length: int = 7  # SCHED_MAX_WND_LENGTH
    sched_retry_s: float = 60.0  # SCHED_RETRY_TIME
    sched_compute_s: float = 1.0  # lab setting: one_sched's time to answer a placement request
    max_actions_per_host: int = 1  # MAX_ACTIONS_PER_HOST
    max_actions_per_cluster: int = 30  # MAX_ACTIONS_PER_CLUSTER
    action_timeout_s: float = 300.0  # ACTION_TIMEOUT

    def scaled(self, factor: float, name: str | None = None) -> Profile:
        """The same logic with every duration (`*_s`) multiplied by `factor`."""
        durations = {f.name: getattr(self, f.name) * factor for f in fields(self) if f.name.endswith("_s")}
        return replace(self, name=name or f"{self.name}x{factor:g}", **durations)

    @property
    def start_monitor_s(self) -> float:
        """How long the IM driver's start_monitor takes to fail on a dead host."""
        return self.ssh_fail_s  # update_remotes' one SSH mkdir (see the module docstring)


PRODUCTION = Profile("production")
FAST = Profile("fast", timed=False)
PROFILES = {p.name: p for p in (PRODUCTION, FAST)}


def profile_named(name: str) -> Profile:
    """`production`, `fast`, or `production/N` (production with every duration divided by N)."""
    base, _, divisor = name.partition("/")
    if base not in PROFILES:
        raise ValueError(f"unknown lab profile {name!r}: one of {sorted(PROFILES)}, or production/N")
    return PROFILES[base].scaled(1 / float(divisor), name) if divisor else PROFILES[base]


@dataclass(slots=True)
class Action:
    """One deploy/migrate action of a placement plan (`src/schedm/PlanAction`)."""

    vm_id: int
    host_id: int
    migrate: bool
    state: str = "READY"  # READY, APPLYING, DONE, ERROR, TIMEOUT
    started: float = 0.0


@dataclass(slots=True)
class Scheduler:
    """SchedulerManager + PlanManager state."""

    wnd_start: float | None = None
    wnd_length: int = 0
    last_place: float = 0.0
    requests: list[float] = field(default_factory=list)  # due times of placement answers
    plan: list[Action] | None = None
    seen_pending: set[int] = field(default_factory=set)
    next_timer: float = 0.0
    next_plan_timer: float = 0.0


class Timelines:
    """oned's timelines on one lab cloud. All methods expect the cloud's lock held."""

    def __init__(self, cloud: Cloud, profile: Profile) -> None:
        self.cloud = cloud
        self.p = profile
        now = cloud.clock()
        self.started = now
        self.events: list[tuple[float, str, int]] = []
        self.next_monitor = now + profile.manager_timer_s
        self.probing: dict[int, float] = {}  # host id -> when start_monitor fails
        self.back_at: dict[int, float] = {}  # lost host powered on -> when monitord hears its beacon
        self.sched = Scheduler(last_place=now, next_timer=now + profile.sched_timer_s,
                               next_plan_timer=now + profile.manager_timer_s)
        self.slots: dict[str, list[float]] = {"vmm": [0.0] * max(1, profile.vmm_threads),
                                              "tm": [0.0] * max(1, profile.tm_threads)}

    def note(self, now: float, what: str, oid: int) -> None:
        self.events.append((now, what, oid))

    def tick(self, now: float) -> None:
        self._monitord(now)
        self._scheduler(now)
        self._plan_manager(now)

    # ---------------------------------------------------------------------------------------------------------
    # Host monitoring (HostMonitorManager.cc)

    def last_beacon(self, host: Host) -> float:
        """The last beacon monitord got from a host that went silent at `host.silent_since`."""
        cut = host.silent_since if host.silent_since is not None else self.cloud.clock()
        if self.p.beacon_s <= 0:
            return cut
        phase = self._beacon_phase(host.id)
        return phase + math.floor((cut - phase) / self.p.beacon_s) * self.p.beacon_s

    def _beacon_phase(self, hid: int) -> float:
        # Agents start at different times: spread their beacons over the period, deterministically, and never on
        # monitord's own tick (which starts with the lab), where "older than the interval" would be a tie.
        return self.started + ((hid + 0.5) * 0.6180339887 % 1.0) * self.p.beacon_s

    def _next_beacon(self, hid: int, after: float) -> float:
        if self.p.beacon_s <= 0:
            return after
        phase = self._beacon_phase(hid)
        return phase + math.ceil((after - phase) / self.p.beacon_s) * self.p.beacon_s

    def _monitord(self, now: float) -> None:
        if now >= self.next_monitor:
            tick_at = self.next_monitor
            self.next_monitor += max(1, math.ceil((now - tick_at) / self.p.manager_timer_s)) * self.p.manager_timer_s
            self._monitor_timer(now)
        for hid, due in sorted(self.probing.items()):
            host = self.cloud.hosts[hid]
            if host.power == POWER_ON:
                del self.probing[hid]  # start_monitor succeeded: the host answers again
                self.note(now, "start_monitor_success", hid)
                if host.state == HostState.INIT or host.wiped:
                    monitor.host_answers(self.cloud, host)
            elif now >= due:
                del self.probing[hid]
                self.note(now, "start_monitor_failure", hid)
                if host.state != HostState.OFFLINE:
                    monitor.host_silent(self.cloud, host)
        self._returning_hosts(now)

    def start_probe(self, host: Host) -> None:
        """start_monitor now (leaving OFFLINE, `HostMonitorManager::update_host`); on a dead host it fails after
        `start_monitor_s`."""
        now = self.cloud.clock()
        self.probing[host.id] = now + self.p.start_monitor_s
        self.note(now, "start_monitor", host.id)

    def _monitor_timer(self, now: float) -> None:
        self.note(now, "monitord_timer", -1)
        target = now - self.p.monitoring_interval_s
        for host in self.cloud.hosts.values():
            if host.power == POWER_ON or host.lost or host.id in self.probing or host.state == HostState.OFFLINE:
                continue
            if self.last_beacon(host) < target:  # strictly older: src/monitor/src/data_model/HostRPCPool.cc
                self.probing[host.id] = now + self.p.start_monitor_s
                self.note(now, "start_monitor", host.id)

    def _returning_hosts(self, now: float) -> None:
        for host in self.cloud.hosts.values():
            waiting = host.lost or host.state == HostState.INIT or host.wiped  # its next report changes something
            if not waiting or host.power != POWER_ON or host.state == HostState.OFFLINE:
                self.back_at.pop(host.id, None)
                continue
            due = self.back_at.setdefault(host.id, self._next_beacon(host.id, now))
            if now >= due:
                del self.back_at[host.id]
                self.note(now, "beacon", host.id)
                monitor.host_answers(self.cloud, host)

    # ---------------------------------------------------------------------------------------------------------
    # Driver operations: how long the state a VM has just entered lasts

    def step_s(self, vm: Vm, now: float) -> float:
        name = vm.lcm.name if vm.state == VmState.ACTIVE else vm.state.name
        host = self.cloud.hosts.get(vm.hid) if vm.hid is not None else None
        reachable = host is not None and host.power == POWER_ON
        if name.startswith("CLEANUP"):
            return self._book("vmm", now, self.p.cleanup_s if reachable else self.p.ssh_fail_s)
        if name.startswith("PROLOG") and not name.endswith("FAILURE"):
            shared = host is not None and self.cloud.datastores[self.cloud.cluster_ds[host.cluster_id]].shared
            duration = self.p.prolog_shared_s if shared else self.p.prolog_copy_s
            return self._book("tm", now, duration if reachable else self.p.ssh_fail_s)
        if name.startswith("BOOT") and not name.endswith("FAILURE"):
            return self._book("vmm", now, self.p.boot_s if reachable else self.p.ssh_fail_s)
        return self.p.other_step_s

    def _book(self, driver: str, now: float, duration: float) -> float:
        """A driver runs at most -t N actions at once: this one starts when a thread is free."""
        slots = self.slots[driver]
        end = max(now, slots[0]) + duration
        heapq.heapreplace(slots, end)
        return end - now

    # ---------------------------------------------------------------------------------------------------------
    # Placement window (SchedulerManager.cc)

    def _scheduler(self, now: float) -> None:
        s = self.sched
        pending = self.cloud.pending
        for vid in sorted(pending - s.seen_pending):
            self._trigger_place(now, vid)
        s.seen_pending = set(pending)
        if now >= s.next_timer:
            s.next_timer = now + self.p.sched_timer_s
            expired = (s.wnd_start is not None and now >= s.wnd_start + self.p.sched_max_wnd_time_s) or \
                s.wnd_length >= self.p.sched_max_wnd_length
            retry = bool(pending) and now >= s.last_place + self.p.sched_retry_s
            if expired or retry:
                self._place(now, "timer")
        for due in [d for d in s.requests if now >= d]:
            s.requests.remove(due)
            self._add_plan(now)

    def _trigger_place(self, now: float, vid: int) -> None:
        s = self.sched
        if s.wnd_start is None:
            s.wnd_start = now
        s.wnd_length += 1
        self.note(now, "trigger_place", vid)
        if now < s.wnd_start + self.p.sched_max_wnd_time_s and s.wnd_length < self.p.sched_max_wnd_length:
            return
        self._place(now, "window")

    def _place(self, now: float, why: str) -> None:
        s = self.sched
        s.last_place, s.wnd_start, s.wnd_length = now, None, 0
        s.requests.append(now + self.p.sched_compute_s)
        self.note(now, f"place:{why}", -1)

    def _place_finished(self, now: float) -> None:
        if self.cloud.pending and self.sched.wnd_start is None:
            self._place(now, "finished")

    # ---------------------------------------------------------------------------------------------------------
    # Plans (PlanManager.cc, Plan.cc)

    def _add_plan(self, now: float) -> None:
        if self.sched.plan is not None:
            self.note(now, "plan_dropped", -1)  # "Cannot add plan. A placement plan is already in progress."
            return
        actions = self._compute_plan()
        if not actions:
            self.note(now, "plan_empty", -1)
            return
        self.sched.plan = actions
        self.note(now, "plan_added", len(actions))
        self._execute(now)

    def _compute_plan(self) -> list[Action]:
        """One action per pending VM that fits somewhere: least-loaded MONITORED host, planned VMs counted."""
        planned: dict[int, tuple[int, int, int]] = {}  # host -> (VMs, cpu, mem) planned on it
        actions = []
        for vid in sorted(self.cloud.pending):
            vm = self.cloud.vms[vid]
            migrate = vm.state != VmState.PENDING
            if migrate and (not vm.resched or vm.plan):
                continue
            host = self._choose(vm, planned, strict=migrate)
            if host is not None:
                n, cpu, mem = planned.get(host, (0, 0, 0))
                need_cpu, need_mem = vm_demand(vm)
                planned[host] = (n + 1, cpu + need_cpu, mem + need_mem)
                actions.append(Action(vid, host, migrate))
        return actions

    def _choose(self, vm: Vm, planned: dict[int, tuple[int, int, int]], strict: bool) -> int | None:
        old = self.cloud.hosts.get(vm.hid) if vm.hid is not None else None
        cluster = old.cluster_id if old is not None else None
        best: tuple[int, int, int] | None = None
        for host in self.cloud.hosts.values():
            n, cpu, mem = planned.get(host.id, (0, 0, 0))
            if host.state != HostState.MONITORED or not fits(host, vm, (cpu, mem)) or (strict and (
                    host.cluster_id != cluster or host.id == vm.hid)):
                continue
            key = (0 if cluster is None or host.cluster_id == cluster else 1, len(host.vm_ids) + n, host.id)
            best = key if best is None or key < best else best
        return best[2] if best is not None else None

    def _plan_manager(self, now: float) -> None:
        s = self.sched
        if s.plan is not None:
            for a in s.plan:
                if a.state in ("APPLYING", "TIMEOUT") and not self.cloud.vms[a.vm_id].plan:
                    a.state = "DONE" if self.cloud.vms[a.vm_id].lcm.name == "RUNNING" else "ERROR"
                    self.note(now, "action_finished", a.vm_id)
            self._check_completed(now)
        if now >= s.next_plan_timer:
            s.next_plan_timer = now + self.p.manager_timer_s
            self.note(now, "plan_timer", -1)
            self._execute(now)

    def _execute(self, now: float) -> None:
        plan = self.sched.plan
        if plan is None:
            return
        per_host: dict[int, int] = {}
        running = 0
        for a in plan:
            if a.state == "APPLYING" and a.started + self.p.action_timeout_s < now:
                a.state = "TIMEOUT"
            if a.state == "APPLYING":
                per_host[a.host_id] = per_host.get(a.host_id, 0) + 1
                running += 1
        for a in plan:
            if a.state != "READY":
                continue
            if per_host.get(a.host_id, 0) >= self.p.max_actions_per_host or \
                    running >= self.p.max_actions_per_cluster:
                break  # the first action that cannot start stops the pass
            if self._start_action(now, a):
                per_host[a.host_id] = per_host.get(a.host_id, 0) + 1
                running += 1
        self._check_completed(now)

    def _start_action(self, now: float, a: Action) -> bool:
        a.started = now
        vm = self.cloud.vms[a.vm_id]
        ok = True
        if a.migrate and vm.resched and not vm.plan:
            self.cloud.pending.discard(vm.id)
            vm.resched = False
            host = self.cloud.hosts[a.host_id]
            lifecycle.migrate_to(self.cloud, vm, host, live=False, action=ACTION_NUMBERS["resched"])
        elif a.migrate:
            ok = False  # no longer rescheduled, or busy: the migrate call fails
        else:
            try:  # a plan deploys with enforce on (PlanManager.cc); an ACTION error marks the action ERROR
                self.cloud.vm_deploy(a.vm_id, a.host_id, enforce=True, by="scheduler")
            except LabError:
                ok = False
        a.state = "APPLYING" if ok else "ERROR"
        self.note(now, "action_start" if ok else "action_error", a.vm_id)
        return ok

    def _check_completed(self, now: float) -> None:
        plan = self.sched.plan
        if plan is None or any(a.state in ("READY", "APPLYING") for a in plan):
            return
        self.sched.plan = None
        self.note(now, "plan_done", len(plan))
        self._place_finished(now)
