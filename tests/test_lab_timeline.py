"""The lab plays oned's own timelines (lab/timeline.py) as their settings say.

Most tests drive the model with a hand-moved clock on the PRODUCTION profile itself (so the expected instants are
OpenNebula's defaults, worked out by hand below); one runs a real LabCloud on a scaled profile.
"""

from __future__ import annotations

import time

import pytest

from oneha.lab.cloud import Cloud
from oneha.lab.sim import LabCloud
from oneha.lab.timeline import FAST, PRODUCTION, Profile, Timelines, profile_named
from oneha.opennebula import HostState, RecoverOp, VmState
from oneha.waiting import wait_until

T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def make(hosts: int, profile: Profile = PRODUCTION, capacity: int = 32) -> tuple[Cloud, Clock, Timelines]:
    clock = Clock()
    cloud = Cloud(clock=clock)
    cloud.add_cluster(0, shared=True)
    for _ in range(hosts):
        cloud.add_host(0, capacity=capacity)
    cloud.timing = Timelines(cloud, profile)
    return cloud, clock, cloud.timing


def run_until(cloud: Cloud, clock: Clock, t: float, step_s: float = 0.25) -> None:
    while clock.t < t - 1e-9:
        clock.t += step_s
        cloud.tick()


def first(timing: Timelines, what: str, oid: int | None = None) -> float:
    return min(t for t, w, i in timing.events if w == what and (oid is None or i == oid))


def test_profiles() -> None:
    assert profile_named("production") is PRODUCTION and profile_named("fast") is FAST and not FAST.timed
    quick = profile_named("production/20")
    assert quick.monitoring_interval_s == 9.0 and quick.manager_timer_s == 0.75 and quick.max_actions_per_host == 1
    assert PRODUCTION.start_monitor_s == 3.0  # update_remotes: one SSH attempt, no retry
    with pytest.raises(ValueError, match="unknown lab profile"):
        profile_named("staging")


def test_silent_host_goes_error_on_the_next_timer_tick_after_the_interval_not_before() -> None:
    cloud, clock, timing = make(3)
    vms = [cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False) for _ in range(3)]
    run_until(cloud, clock, T0 + 47.25)
    cloud.host_kill(0)
    # Host 0 beacons at T0 + 9.27 + 30k (its phase, 0.309 of the period): its last beacon was T0 + 39.27. Silent
    # for 180 s at T0 + 219.27; monitord ticks at T0 + 15k, so the first tick that finds it is T0 + 225;
    # start_monitor (its update_remotes: one SSH attempt of 3 s) fails 3 s later: ERROR at T0 + 228, its RUNNING
    # VMs UNKNOWN in the same step.
    assert timing.last_beacon(cloud.hosts[0]) == pytest.approx(T0 + 39.27, abs=0.01)
    run_until(cloud, clock, T0 + 224.75)
    assert cloud.hosts[0].state == HostState.MONITORED
    assert all(cloud.vms[v].lcm.name == "RUNNING" for v in vms)
    assert "start_monitor" not in {w for _, w, _ in timing.events}
    run_until(cloud, clock, T0 + 227.75)
    assert first(timing, "start_monitor", 0) == T0 + 225
    assert cloud.hosts[0].state == HostState.MONITORED
    run_until(cloud, clock, T0 + 228)
    assert cloud.hosts[0].state == HostState.ERROR
    assert all(cloud.vms[v].lcm.name == "UNKNOWN" for v in vms)
    assert [h for h in cloud.hosts.values() if h.state == HostState.ERROR] == [cloud.hosts[0]]


def test_a_host_back_before_start_monitor_fails_is_never_error() -> None:
    cloud, clock, timing = make(2)
    cloud.host_partition(1)
    run_until(cloud, clock, T0 + 300)
    assert cloud.hosts[1].state == HostState.ERROR
    cloud.host_revive(1)
    run_until(cloud, clock, T0 + 330)  # its next beacon brings it back
    assert cloud.hosts[1].state == HostState.MONITORED
    start = clock.t
    cloud.host_partition(1)
    while 1 not in timing.probing:  # until monitord's timer retries start_monitor over SSH
        run_until(cloud, clock, clock.t + 0.25)
    assert clock.t - start > PRODUCTION.monitoring_interval_s - PRODUCTION.beacon_s
    due = timing.probing[1]
    cloud.host_revive(1)  # the host answers before the last SSH attempt gives up
    run_until(cloud, clock, due + 60)
    assert cloud.hosts[1].state == HostState.MONITORED
    assert [t for t, w, i in timing.events if w == "start_monitor_failure" and t > start] == []


def test_recover_recreate_on_a_dead_host_costs_the_ssh_failure_before_pending() -> None:
    cloud, clock, _ = make(2)
    dead = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    alive = cloud.create_vm({"HOST": 1, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)
    cloud.vm_recover(dead, RecoverOp.DELETE_RECREATE)
    cloud.vm_recover(alive, RecoverOp.DELETE_RECREATE)
    run_until(cloud, clock, T0 + PRODUCTION.cleanup_s)
    assert cloud.vms[alive].state == VmState.PENDING  # the cleanup on a live host took cleanup_s
    run_until(cloud, clock, T0 + PRODUCTION.ssh_fail_s - 0.25)
    assert cloud.vms[dead].lcm.name == "CLEANUP_RESUBMIT"
    run_until(cloud, clock, T0 + PRODUCTION.ssh_fail_s)
    assert cloud.vms[dead].state == VmState.PENDING


def test_vmm_driver_runs_at_most_its_threads_at_once() -> None:
    profile = Profile("t", vmm_threads=2)
    cloud, clock, _ = make(2, profile)
    vms = [cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False) for _ in range(5)]
    cloud.host_kill(0)
    for v in vms:
        cloud.vm_recover(v, RecoverOp.DELETE_RECREATE)
    pending_at = {}
    while len(pending_at) < 5:
        run_until(cloud, clock, clock.t + 0.25)
        pending_at.update({v: clock.t for v in vms if v not in pending_at and cloud.vms[v].state != VmState.ACTIVE})
    # two cleanups at a time, 3 s each: 3, 3, 6, 6, 9
    assert sorted(t - T0 for t in pending_at.values()) == [3, 3, 6, 6, 9]


def deploy_starts(timing: Timelines) -> list[tuple[float, int]]:
    return [(t, v) for t, w, v in timing.events if w == "action_start"]


def test_placement_window_plan_timer_and_one_action_per_host() -> None:
    cloud, clock, timing = make(2)
    busy_per_host_max = 0
    vms = [cloud.create_vm({"STATE": "PENDING"}, emit=False) for _ in range(6)]
    cloud.tick()  # the window opens now
    while not all(cloud.vms[v].lcm.name == "RUNNING" for v in vms):
        run_until(cloud, clock, clock.t + 0.25)
        for h in cloud.hosts.values():
            deploying = sum(1 for v in h.vm_ids if cloud.vms[v].lcm.name in ("PROLOG", "BOOT"))
            busy_per_host_max = max(busy_per_host_max, deploying)
        assert clock.t < T0 + 200
    assert busy_per_host_max == 1  # MAX_ACTIONS_PER_HOST
    # 6 VMs < SCHED_MAX_WND_LENGTH: the window is sent when SCHED_MAX_WND_TIME (10 s) has passed, on the scheduler's
    # 5 s timer (T0 + 10); the plan comes 1 s later and starts one deploy per host at once (T0 + 11); the others
    # start on the plan manager's 15 s timer (T0 + 15, T0 + 30): each deploy (1 s prolog + 3 s boot) is done by then.
    assert first(timing, "place:timer") == T0 + 10
    starts = sorted({t - T0 for t, _ in deploy_starts(timing)})
    assert starts == [11, 15, 30]
    assert len(deploy_starts(timing)) == 6


def test_plan_stops_at_the_first_action_whose_host_is_busy() -> None:
    cloud, clock, timing = make(2)
    for _ in range(2):
        cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    vms = [cloud.create_vm({"STATE": "PENDING"}, emit=False) for _ in range(7)]  # a full window: placed at once
    cloud.tick()
    run_until(cloud, clock, T0 + 1.25)
    plan = timing.sched.plan
    assert plan is not None and [a.host_id for a in plan[:3]] == [1, 1, 0]
    # The second action waits for host 1, and nothing after it starts, although host 0 is free.
    assert [a.state for a in plan[:3]] == ["APPLYING", "READY", "READY"]
    assert len(deploy_starts(timing)) == 1 and vms[0] in cloud.hosts[1].vm_ids


def test_an_action_past_action_timeout_no_longer_holds_its_host() -> None:
    cloud, clock, timing = make(2, Profile("slow prolog", prolog_shared_s=100.0, action_timeout_s=20.0))
    vms = [cloud.create_vm({"STATE": "PENDING"}, emit=False) for _ in range(4)]
    cloud.tick()
    run_until(cloud, clock, T0 + 50)
    starts = sorted((t - T0, v) for t, v in deploy_starts(timing))
    # two deploys at T0 + 11 (one per host); at T0 + 15 and T0 + 30 their hosts are busy; at T0 + 45 they are older
    # than ACTION_TIMEOUT (20 s): TIMEOUT frees the slots and the next two start while the first two still copy.
    assert [t for t, _ in starts] == [11, 11, 45, 45]
    assert {cloud.vms[v].lcm.name for v in vms} == {"PROLOG"}
    assert [a.state for a in timing.sched.plan or []] == ["TIMEOUT", "TIMEOUT", "APPLYING", "APPLYING"]


def test_a_vm_that_cannot_be_placed_waits_for_the_retry() -> None:
    cloud, clock, timing = make(1, capacity=1)
    cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    late = cloud.create_vm({"STATE": "PENDING"}, emit=False)
    cloud.tick()
    run_until(cloud, clock, T0 + 12)
    assert first(timing, "plan_empty") == T0 + 11  # placed at T0 + 10: nowhere to go
    cloud.hosts[0].capacity = 2  # room appears right after
    run_until(cloud, clock, T0 + 69.75)
    assert cloud.vms[late].state == VmState.PENDING  # SCHED_RETRY_TIME = 60 s after the last placement
    run_until(cloud, clock, T0 + 80)
    # the scheduler's 5 s timer at T0 + 70 sees the retry time passed; the plan comes 1 s later
    assert first(timing, "action_start", late) == T0 + 71


def test_lab_cloud_plays_a_scaled_production_timeline() -> None:
    profile = PRODUCTION.scaled(0.01)
    with LabCloud(hosts=3, vms=6, profile=profile, tick_s=0.01) as lab:
        cloud = lab.cloud
        timing = cloud.timing
        assert timing is not None
        victims = sorted(cloud.hosts[0].vm_ids)
        cut = time.monotonic()
        cloud.host_kill(0)
        wait_until(lambda: cloud.hosts[0].state == HostState.ERROR, 10, what="ERROR")
        err = first(timing, "start_monitor_failure", 0)
        # not before a full interval of silence plus the failed start_monitor, at most a beacon + a tick later
        assert cut + profile.monitoring_interval_s - profile.beacon_s + profile.start_monitor_s - 0.05 <= err
        assert err <= cut + profile.monitoring_interval_s + profile.manager_timer_s + profile.start_monitor_s + 0.1
        for v in victims:
            cloud.vm_recover(v, RecoverOp.DELETE_RECREATE)
        wait_until(lambda: all(cloud.running.get(v) and 0 not in cloud.running[v] for v in victims), 10,
                   what="recreated VMs running elsewhere")
        assert cloud.oracle()["duplicates"] == []
