"""The lab's `one.host.status` and monitord's reaction to it, as OpenNebula 7.4 (docs/research/oned-agreement.md §1-§3):
`HostAPI.cc`/`Host.cc` enable/disable/offline, `HostMonitorManager::update_host`, the scheduler's MONITORED-only hosts,
and a dead host that oned still shows MONITORED being eligible for a recreated VM (the real oned's measurement).

The model is driven on a hand-moved clock (fast profile and PRODUCTION), so each expectation is exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from oneha.lab.cloud import Cloud
from oneha.lab.model import LabError
from oneha.lab.timeline import PRODUCTION, Timelines
from oneha.opennebula import ErrorCode, HostState, RecoverOp, VmState
from tests.test_lab_timeline import T0, Clock, make, run_until

INTERVAL = 5.0  # the fast profile's monitoring interval in these tests


def fast(hosts: int = 3) -> tuple[Cloud, Clock, list[tuple[str, int, str, str | None]]]:
    clock = Clock()
    cloud = Cloud(clock=clock, monitoring_interval_s=INTERVAL, step_delay_s=0.1)
    cloud.add_cluster(0, shared=True)
    for _ in range(hosts):
        cloud.add_host(0, capacity=32)
    events: list[tuple[str, int, str, str | None]] = []

    def sink(kind: str, oid: int, state: str, lcm: str | None, *_: Any) -> None:
        events.append((kind, oid, state, lcm))

    cloud.sink = sink
    return cloud, clock, events


def host_xml(cloud: Cloud, hid: int) -> str:
    return cloud.xml.host_xml(cloud, cloud.hosts[hid])


def lcm(cloud: Cloud, vid: int) -> str:
    return cloud.vms[vid].state_name()


def test_offline_wipes_capacity_and_keeps_a_dead_hosts_vms_running_for_good() -> None:
    cloud, clock, events = fast()
    vms = [cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False) for _ in range(3)]
    assert "<TOTAL_CPU>3200</TOTAL_CPU>" in host_xml(cloud, 0)
    cloud.host_status(0, 2)
    assert cloud.hosts[0].state == HostState.OFFLINE
    assert "<TOTAL_CPU>0</TOTAL_CPU>" in host_xml(cloud, 0) and "<MAX_MEM>0</MAX_MEM>" in host_xml(cloud, 0)
    assert events == [("HOST", 0, "OFFLINE", None)]  # the state event; no VM touched
    cloud.host_kill(0)
    run_until(cloud, clock, T0 + 10 * INTERVAL)
    assert cloud.hosts[0].state == HostState.OFFLINE  # never ERROR: not monitored
    assert all(lcm(cloud, v) == "ACTIVE/RUNNING" for v in vms)  # oned's view; they run nowhere (the oracle: lost)
    assert sorted(cloud.oracle()["lost"]) == vms
    assert len(events) == 1
    with pytest.raises(LabError) as refused:
        cloud.host_status(0, 7)
    assert refused.value.code == ErrorCode.INTERNAL


def test_offline_host_reports_are_ignored() -> None:
    cloud, clock, _ = fast()
    vid = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)
    run_until(cloud, clock, T0 + 2 * INTERVAL)
    assert cloud.hosts[0].state == HostState.ERROR and lcm(cloud, vid) == "ACTIVE/UNKNOWN"
    cloud.host_status(0, 2)
    cloud.host_revive(0)
    run_until(cloud, clock, T0 + 5 * INTERVAL)
    assert cloud.hosts[0].state == HostState.OFFLINE and lcm(cloud, vid) == "ACTIVE/UNKNOWN"  # nothing heard


def test_offline_to_disabled_probes_at_once_and_its_vms_go_unknown_with_no_host_event() -> None:
    cloud, clock, events = fast()
    vms = [cloud.create_vm({"HOST": 1, "STATE": "RUNNING"}, emit=False) for _ in range(2)]
    cloud.host_status(1, 2)
    cloud.host_kill(1)
    run_until(cloud, clock, T0 + 3 * INTERVAL)
    assert all(lcm(cloud, v) == "ACTIVE/RUNNING" for v in vms)
    events.clear()
    cloud.host_status(1, 1)  # OFFLINE -> DISABLED: monitord probes at once, the probe fails
    assert cloud.hosts[1].state == HostState.DISABLED
    assert all(lcm(cloud, v) == "ACTIVE/UNKNOWN" for v in vms)
    assert events[0] == ("HOST", 1, "DISABLED", None)
    assert [e for e in events if e[0] == "HOST"] == [("HOST", 1, "DISABLED", None)]  # no ERROR: DISABLED kept


def test_a_dead_disabled_host_is_still_monitored_its_vms_go_unknown_and_it_stays_disabled() -> None:
    cloud, clock, events = fast()
    vid = cloud.create_vm({"HOST": 2, "STATE": "RUNNING"}, emit=False)
    cloud.host_status(2, 1)
    cloud.host_kill(2)
    run_until(cloud, clock, T0 + 2 * INTERVAL)
    assert cloud.hosts[2].state == HostState.DISABLED and lcm(cloud, vid) == "ACTIVE/UNKNOWN"
    assert [e for e in events if e[0] == "HOST"] == [("HOST", 2, "DISABLED", None)]


def test_enable_from_disabled_is_monitored_from_offline_or_error_init_then_a_probe() -> None:
    cloud, clock, events = fast()
    cloud.host_status(0, 1)
    cloud.host_status(0, 0)
    assert [e[2] for e in events] == ["DISABLED", "MONITORED"]  # no INIT: capacity known
    events.clear()
    cloud.host_status(0, 2)
    cloud.host_status(0, 0)  # from OFFLINE: INIT, capacity still 0 when the call returns (a real oned 7.4: seen)
    assert [e[2] for e in events] == ["OFFLINE", "INIT"] and "<TOTAL_CPU>0</TOTAL_CPU>" in host_xml(cloud, 0)
    run_until(cloud, clock, clock() + 0.1)  # the immediate probe's answer: MONITORED, capacity known again
    assert [e[2] for e in events] == ["OFFLINE", "INIT", "MONITORED"]
    assert "<TOTAL_CPU>3200</TOTAL_CPU>" in host_xml(cloud, 0)
    events.clear()
    cloud.host_status(1, 2)
    cloud.host_kill(1)
    cloud.host_status(1, 0)  # a dead host enabled from OFFLINE: INIT, the immediate probe fails: ERROR
    assert [e[2] for e in events if e[0] == "HOST"] == ["OFFLINE", "INIT", "ERROR"]
    events.clear()
    cloud.host_status(1, 0)  # enabled from ERROR: INIT; ERROR again when its next probe fails
    assert cloud.hosts[1].state == HostState.INIT
    run_until(cloud, clock, T0 + 2 * INTERVAL)
    assert [e[2] for e in events if e[0] == "HOST"] == ["INIT", "ERROR"]


def test_scheduler_places_only_on_monitored_hosts_and_deploy_refuses_only_offline() -> None:
    cloud, clock, _ = fast(4)
    cloud.host_status(0, 1)
    cloud.host_status(1, 2)
    cloud.host_kill(2)
    cloud.host_status(2, 2)
    cloud.host_status(2, 0)  # dead: INIT -> ERROR
    vid = cloud.create_vm({"STATE": "PENDING"}, emit=False)
    run_until(cloud, clock, T0 + 1)
    assert cloud.vms[vid].hid == 3  # the only MONITORED host
    other = cloud.create_vm({"STATE": "PENDING"}, emit=False)
    cloud.host_status(3, 1)
    run_until(cloud, clock, T0 + 2)
    assert cloud.vms[other].state == VmState.PENDING  # nowhere to go
    with pytest.raises(LabError, match="Host is offline") as refused:
        cloud.vm_deploy(other, 1)
    assert refused.value.code == ErrorCode.ACTION
    cloud.vm_deploy(other, 0)  # DISABLED is accepted by one.vm.deploy (VirtualMachineAPI.cc): only the scheduler
    assert cloud.vms[other].hid == 0  # leaves it out


def test_recover_recreate_while_the_dead_host_is_still_monitored_lands_back_on_it() -> None:
    """The real oned's measurement (issue 13): the scheduler still counts the dead host, which is the emptiest once
    its VMs were cleaned up; the deployment there fails (the TM prolog over SSH: PROLOG_FAILURE) and the VM runs
    nowhere."""
    cloud, clock, _ = fast(3)
    victim = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    for h in (1, 2):
        for _ in range(4):
            cloud.create_vm({"HOST": h, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)  # oned has not noticed yet: host 0 is MONITORED
    cloud.vm_recover(victim, RecoverOp.DELETE_RECREATE)
    run_until(cloud, clock, T0 + 1)
    assert cloud.hosts[0].state == HostState.MONITORED
    assert cloud.vms[victim].hid == 0 and len(cloud.vms[victim].history) == 2  # recreated onto the dead host
    assert lcm(cloud, victim) == "ACTIVE/PROLOG_FAILURE"
    assert victim in cloud.oracle()["lost"]


def test_recover_recreate_after_offline_lands_on_a_live_host() -> None:
    cloud, clock, _ = fast(3)
    victim = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    for h in (1, 2):
        for _ in range(4):
            cloud.create_vm({"HOST": h, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)
    cloud.host_status(0, 2)
    cloud.vm_recover(victim, RecoverOp.DELETE_RECREATE)  # RUNNING on an OFFLINE host: accepted
    run_until(cloud, clock, T0 + 1)
    assert cloud.vms[victim].hid in (1, 2) and lcm(cloud, victim) == "ACTIVE/RUNNING"
    assert cloud.oracle()["lost"] == [] and cloud.oracle()["duplicates"] == []


def test_production_offline_to_disabled_probe_takes_start_monitor() -> None:
    cloud, clock, timing = make(2)
    vid = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)
    cloud.host_status(0, 2)
    run_until(cloud, clock, T0 + 2 * PRODUCTION.monitoring_interval_s)
    assert cloud.hosts[0].state == HostState.OFFLINE and lcm(cloud, vid) == "ACTIVE/RUNNING"
    assert not [e for e in timing.events if e[1] == "start_monitor"]  # monitord never probed it
    at = clock.t
    cloud.host_status(0, 1)
    run_until(cloud, clock, at + PRODUCTION.start_monitor_s - 0.25)
    assert lcm(cloud, vid) == "ACTIVE/RUNNING"
    run_until(cloud, clock, at + PRODUCTION.start_monitor_s + 0.25)
    assert lcm(cloud, vid) == "ACTIVE/UNKNOWN" and cloud.hosts[0].state == HostState.DISABLED


def test_production_enable_from_offline_is_init_until_the_probe_answers() -> None:
    cloud, clock, timing = make(2)
    cloud.host_status(1, 2)
    cloud.host_status(1, 0)
    assert cloud.hosts[1].state in (HostState.INIT, HostState.MONITORED)
    run_until(cloud, clock, T0 + 1)
    assert cloud.hosts[1].state == HostState.MONITORED
    assert isinstance(timing, Timelines)


def test_a_cold_migration_of_a_running_vm_off_a_dead_host_reverts_to_running_there() -> None:
    """resched from RUNNING: SAVE_MIGRATE runs the save on the old host; on a dead host it fails and
    `revert_migrate_after_failure` puts the VM back RUNNING on it (LifeCycleStates.cc): in oned's view only."""
    cloud, clock, _ = fast(3)
    vid = cloud.create_vm({"HOST": 0, "STATE": "RUNNING"}, emit=False)
    cloud.host_kill(0)
    cloud.host_status(0, 2)  # OFFLINE: the VM stays RUNNING, and a resched is accepted
    cloud.vm_action("resched", vid)
    run_until(cloud, clock, T0 + 1)
    states = [s for _, k, i, s in cloud.oracle()["timeline"] if k == "vm" and i == vid]
    assert "ACTIVE/SAVE_MIGRATE" in states and "ACTIVE/PROLOG_MIGRATE" not in states
    assert cloud.vms[vid].hid == 0 and lcm(cloud, vid) == "ACTIVE/RUNNING" and vid in cloud.oracle()["lost"]
    alive = cloud.create_vm({"HOST": 1, "STATE": "RUNNING"}, emit=False)
    cloud.vm_action("resched", alive)  # a live source: saved, then moved
    run_until(cloud, clock, T0 + 2)
    assert cloud.vms[alive].hid == 2 and lcm(cloud, alive) == "ACTIVE/RUNNING"
    assert cloud.oracle()["running"][str(alive)] == [2]
