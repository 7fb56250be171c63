"""Failure scenarios: the lab produces oned's state sequences and the oracle tells the truth."""

from __future__ import annotations

from typing import Any

import pyone

from oneha.lab.sim import LabCloud
from oneha.opennebula import HostState, LcmState, VmState
from oneha.waiting import wait_until
from tests.labkit import call, running_lab


def server(lab: LabCloud) -> Any:
    return pyone.OneServer(lab.rpc_url, session=lab.session)


def vm_is(one: Any, vid: int, state: VmState, lcm: LcmState = LcmState.LCM_INIT) -> bool:
    vm = one.vm.info(vid)
    return int(vm.STATE) == state and (state != VmState.ACTIVE or int(vm.LCM_STATE) == lcm)


def last_hid(one: Any, vid: int) -> int:
    return int(one.vm.info(vid).HISTORY_RECORDS.HISTORY[-1].HID)


def timeline_of(lab: LabCloud, kind: str, oid: int) -> list[str]:
    return [s for _, k, i, s in call(lab.rpc_url, "lab.oracle")["timeline"] if k == kind and i == oid]


def test_kill_host_error_then_unknown_then_recover_recreate_elsewhere() -> None:
    with running_lab(hosts=3, vms=6) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: int(one.host.info(1).STATE) == HostState.ERROR, 5, what="host ERROR")
        wait_until(lambda: vm_is(one, 4, VmState.ACTIVE, LcmState.UNKNOWN), 5, what="VM UNKNOWN")
        times = call(lab.rpc_url, "lab.oracle")["timeline"]
        error_at = next(t for t, k, i, s in times if k == "host" and i == 1 and s == "ERROR")
        unknown_at = next(t for t, k, i, s in times if k == "vm" and i == 4 and s == "ACTIVE/UNKNOWN")
        assert error_at <= unknown_at
        assert call(lab.rpc_url, "lab.oracle")["lost"] == [1, 4]  # UNKNOWN and running nowhere

        one.vm.recover(4, 4)
        wait_until(lambda: vm_is(one, 4, VmState.ACTIVE, LcmState.RUNNING), 5, what="recreated")
        assert last_hid(one, 4) != 1
        assert int(one.vm.info(4).ID) == 4  # same ID
        seq = timeline_of(lab, "vm", 4)
        assert seq[-6:] == ["ACTIVE/UNKNOWN", "ACTIVE/CLEANUP_RESUBMIT", "PENDING", "ACTIVE/PROLOG", "ACTIVE/BOOT",
                            "ACTIVE/RUNNING"]
        oracle = call(lab.rpc_url, "lab.oracle")
        assert oracle["lost"] == [1] and oracle["duplicates"] == []
        assert oracle["running"]["4"] == [last_hid(one, 4)]


def test_resched_on_shared_datastore_migrates_from_unknown() -> None:
    with running_lab(hosts=4, vms=4, clusters=2) as lab:  # hosts 0, 2 in cluster 0 (shared)
        one = server(lab)
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.UNKNOWN), 5, what="UNKNOWN")
        one.vm.action("resched", 0)
        vm = one.vm.info(0)
        # The flag is up until the scheduler's next tick takes the VM (and clears it): that may be before this read.
        assert int(vm.RESCHED) == 1 or int(vm.LCM_STATE) != LcmState.UNKNOWN
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.RUNNING), 5, what="migrated")
        hist = one.vm.info(0).HISTORY_RECORDS.HISTORY
        assert [int(h.HID) for h in hist] == [0, 2]  # same cluster, new history record
        assert int(hist[0].ETIME) > 0 and int(hist[0].ACTION) == 1  # the scheduler migrates: MIGRATE, not RESCHED
        assert "ACTIVE/PROLOG_MIGRATE_UNKNOWN" in timeline_of(lab, "vm", 0)
        assert call(lab.rpc_url, "lab.oracle")["running"]["0"] == [2]


def test_resched_running_vm_cold_migrates() -> None:
    with running_lab(hosts=2, vms=1) as lab:
        one = server(lab)
        one.vm.action("resched", 0)
        wait_until(lambda: last_hid(one, 0) == 1 and vm_is(one, 0, VmState.ACTIVE, LcmState.RUNNING), 5,
                   what="migrated")
        assert timeline_of(lab, "vm", 0)[-3:] == ["ACTIVE/PROLOG_MIGRATE", "ACTIVE/BOOT", "ACTIVE/RUNNING"]
        assert call(lab.rpc_url, "lab.oracle")["running"] == {"0": [1]}


def test_resched_from_unknown_on_local_datastore_fails() -> None:
    with running_lab(hosts=4, vms=4, clusters=2) as lab:  # VM 1 on host 1, cluster 1 (local)
        one = server(lab)
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: vm_is(one, 1, VmState.ACTIVE, LcmState.UNKNOWN), 5, what="UNKNOWN")
        one.vm.action("resched", 1)
        wait_until(lambda: vm_is(one, 1, VmState.ACTIVE, LcmState.PROLOG_MIGRATE_UNKNOWN_FAILURE), 5,
                   what="prolog failure")


def test_partition_and_recreate_is_a_duplicate_and_fencing_ends_it() -> None:
    with running_lab(hosts=2, vms=2) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.host.partition", 0)
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.UNKNOWN), 5, what="UNKNOWN")
        oracle = call(lab.rpc_url, "lab.oracle")
        assert oracle["running"]["0"] == [0] and oracle["lost"] == []  # still really running
        one.vm.recover(0, 4)
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.RUNNING), 5, what="recreated")
        oracle = call(lab.rpc_url, "lab.oracle")
        assert oracle["duplicates"] == [0] and oracle["running"]["0"] == [0, 1]
        call(lab.rpc_url, "lab.host.fence", 0)
        oracle = call(lab.rpc_url, "lab.oracle")
        assert oracle["duplicates"] == [] and oracle["running"]["0"] == [1]


def test_revive_after_partition_and_after_fence() -> None:
    with running_lab(hosts=3, vms=3) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.host.partition", 0)
        call(lab.rpc_url, "lab.host.kill", 1)
        wait_until(lambda: int(one.host.info(0).STATE) == HostState.ERROR
                   and int(one.host.info(1).STATE) == HostState.ERROR, 5, what="both ERROR")
        call(lab.rpc_url, "lab.host.revive", 0)
        call(lab.rpc_url, "lab.host.revive", 1)
        wait_until(lambda: int(one.host.info(0).STATE) == HostState.MONITORED
                   and int(one.host.info(1).STATE) == HostState.MONITORED, 5, what="both MONITORED")
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.RUNNING), 5, what="partitioned VM RUNNING")
        wait_until(lambda: vm_is(one, 1, VmState.POWEROFF), 5, what="killed VM POWEROFF")
        assert timeline_of(lab, "host", 0)[-2:] == ["ERROR", "MONITORED"]


def test_disabled_host_never_goes_error_but_its_vms_go_unknown() -> None:
    with running_lab(hosts=2, vms=2) as lab:
        one = server(lab)
        one.host.status(0, 1)
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.UNKNOWN), 5, what="UNKNOWN")
        assert int(one.host.info(0).STATE) == HostState.DISABLED
        assert timeline_of(lab, "host", 0) == ["MONITORED", "DISABLED"]


def test_crash_then_resume_boots_on_the_same_host() -> None:
    with running_lab(hosts=2, vms=2) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.vm.crash", 1, "crashed")  # libvirt says crashed: FAILURE, UNKNOWN on the next probe
        wait_until(lambda: vm_is(one, 1, VmState.ACTIVE, LcmState.UNKNOWN), 10, what="UNKNOWN")
        assert call(lab.rpc_url, "lab.oracle")["lost"] == [1]
        one.vm.action("resume", 1)
        wait_until(lambda: vm_is(one, 1, VmState.ACTIVE, LcmState.RUNNING), 5, what="resumed")
        assert timeline_of(lab, "vm", 1)[-3:] == ["ACTIVE/UNKNOWN", "ACTIVE/BOOT_UNKNOWN", "ACTIVE/RUNNING"]
        assert last_hid(one, 1) == 1 and call(lab.rpc_url, "lab.oracle")["running"]["1"] == [1]


def test_sticky_boot_failure_fails_every_recreate() -> None:
    with running_lab(hosts=2, vms=1) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.vm.fail", 0, "BOOT_FAILURE", True)
        assert vm_is(one, 0, VmState.ACTIVE, LcmState.BOOT_FAILURE)
        for _ in range(2):
            one.vm.recover(0, 4)
            wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.BOOT_FAILURE), 5, what="fails again")
        assert call(lab.rpc_url, "lab.oracle")["lost"] == [0]
        one.vm.recover(0, 3)
        wait_until(lambda: vm_is(one, 0, VmState.DONE), 5, what="deleted")
        assert call(lab.rpc_url, "lab.oracle")["lost"] == []


def test_non_sticky_failure_then_retry_recovers() -> None:
    with running_lab(hosts=2, vms=1) as lab:
        one = server(lab)
        call(lab.rpc_url, "lab.vm.fail", 0, "PROLOG_FAILURE", False)
        assert vm_is(one, 0, VmState.ACTIVE, LcmState.PROLOG_FAILURE)
        one.vm.recover(0, 2)
        wait_until(lambda: vm_is(one, 0, VmState.ACTIVE, LcmState.RUNNING), 5, what="retried")


def test_boot_on_a_dead_host_fails() -> None:
    with running_lab(hosts=1, vms=0, step_delay_s=0.2) as lab:
        one = server(lab)
        vid = call(lab.rpc_url, "lab.vm.create", {"STATE": "PENDING"})
        wait_until(lambda: vm_is(one, vid, VmState.ACTIVE, LcmState.PROLOG), 5, what="prolog")
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: vm_is(one, vid, VmState.ACTIVE, LcmState.PROLOG_FAILURE), 5, what="prolog failure")


def test_recover_recreate_from_poweroff_and_suspended_and_not_from_done() -> None:
    with running_lab(hosts=2, vms=0) as lab:
        one = server(lab)
        off = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "POWEROFF"})
        sus = call(lab.rpc_url, "lab.vm.create", {"HOST": 1, "STATE": "SUSPENDED"})
        for vid in (off, sus):
            one.vm.recover(vid, 4)
        wait_until(lambda: all(vm_is(one, v, VmState.ACTIVE, LcmState.RUNNING) for v in (off, sus)), 5,
                   what="recreated")
        one.vm.recover(off, 5)
        assert vm_is(one, off, VmState.DONE)
        try:
            one.vm.recover(off, 4)
            raise AssertionError("recover 4 of a DONE VM must fail")
        except pyone.OneActionException:
            pass
