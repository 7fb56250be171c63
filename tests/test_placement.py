"""Placement by oneha (issue 13, contract point 6): PENDING VMs of a failed host deployed by the workers themselves.

End to end: the lab (a timed profile whose scheduler window is held long, so who placed what is visible in the lab's
call log, `lab.deploys`), a real Redis, `oneha worker` subprocesses. Judged by the lab's oracle (none twice, none lost)
and by the host share read back. The pure choice is unit-tested at the end.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from oneha.lab.timeline import PRODUCTION, Profile
from oneha.opennebula import HostState, HostView, LcmState, VmState, VmView
from oneha.waiting import wait_until
from oneha.workers.placement import candidate_hosts, scheduler_reason
from tests.labkit import call, running_lab
from tests.workerkit import worker_stack

pytestmark = pytest.mark.slow
FAST_LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}


def held_scheduler(window_s: float) -> Profile:
    """oned's timelines, 20 times faster, a host ERROR within ~0.5 s, and a scheduler that places only once its
    window (`window_s`) has passed: oneha has that long to place the VMs itself."""
    return replace(PRODUCTION.scaled(1 / 20, "held"), manager_timer_s=0.1, beacon_s=0.1, monitoring_interval_s=0.3,
                   ssh_fail_s=0.05, sched_timer_s=0.1, sched_max_wnd_time_s=window_s,
                   sched_max_wnd_length=100_000, sched_retry_s=1000.0)


def lab_options(window_s: float, capacity: int = 8) -> dict[str, Any]:
    return {"profile": held_scheduler(window_s), "capacity": capacity, "monitoring_interval_s": 0.3,
            "step_delay_s": 0.05}


def kill_and_wait_error(url: str, host: int) -> None:
    call(url, "lab.host.kill", host)
    wait_until(lambda: int(call(url, "one.host.info", host).split("<STATE>")[1].split("<")[0]) == 3, 10,
               what=f"host {host} ERROR")


def running_on(url: str, vms: list[int]) -> dict[str, Any]:
    def all_running() -> dict[str, Any] | None:
        o = call(url, "lab.oracle")
        return o if all(o["running"].get(str(v)) for v in vms) else None

    o = wait_until(all_running, 20, what="VMs running")
    assert o["duplicates"] == [] and o["lost"] == []
    return o


def deploys(url: str) -> list[dict[str, Any]]:
    return [c for c in call(url, "lab.deploys") if c["call"] == "deploy"]


def host_share(url: str) -> dict[int, HostView]:
    from lxml import etree

    pool = etree.fromstring(call(url, "one.hostpool.info").encode())
    return {v.id: v for v in (HostView.from_xml(h) for h in pool.findall("HOST"))}


def test_vms_of_a_failed_host_spread_in_priority_order_within_capacity_and_cluster(tmp_path: Path,
                                                                                  redis_url: str) -> None:
    # Cluster 0: hosts 0, 2, 4, 6; cluster 1: hosts 1, 3, 5 (empty: never to be used). Hosts 2, 4, 6 hold 4 VMs
    # each of 8 slots: 12 free slots for the 14 VMs of host 0, so the two last in priority order find no room.
    with running_lab(hosts=7, clusters=2, **lab_options(window_s=60.0)) as lab:
        url = lab.rpc_url
        for h in (2, 4, 6):
            for _ in range(4):
                call(url, "lab.vm.create", {"HOST": h, "STATE": "RUNNING"})
        prio = [3] * 4 + [2] * 4 + [1] * 3 + [0] * 3
        vms = [call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING", "HA_PRIORITY": p}) for p in prio]
        priority = dict(zip(vms, prio, strict=True))
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=4,
                          policy={"host_action": "recreate"}) as stack:
            kill_and_wait_error(url, 0)
            inc = stack.report_host(0)
            closed = stack.wait_closed(inc, timeout_s=40)
            assert closed.status.value == "recovered", closed.detail
            records = stack.store.vm_records(inc)
            placed = [v for v in vms if records[v].get("placement") == "oneha"]
            left = [v for v in vms if v not in placed]
            assert len(placed) == 12 and len(left) == 2, records
            assert all(priority[v] <= 1 for v in left)  # the highest priorities got the room
            assert all(records[v]["placement_detail"] == "no host of the cluster with room" for v in left)
            audit = [e for e in stack.store.log(inc) if e["event"] == "placement"]
            assert sorted(e["vm"] for e in audit) == sorted(left)
            o = running_on(url, placed)
            where = {v: o["running"][str(v)][0] for v in placed}
            counts = {h: sum(1 for v in placed if where[v] == h) for h in (2, 4, 6)}
            assert set(where.values()) <= {2, 4, 6}, where  # its cluster, never the failed host
            assert all(2 <= n <= 6 for n in counts.values()), counts  # spread, most free first
            share = host_share(url)
            assert all(share[h].cpu_usage <= share[h].max_cpu and share[h].mem_usage <= share[h].max_mem
                       for h in share)
            # every deploy was oneha's (the scheduler's window is held), in priority order
            made = {c["vm"]: c for c in deploys(url) if not c["error"]}
            assert {c["by"] for c in made.values()} == {"api"} and sorted(made) == sorted(placed)
            assert max(made[v]["t"] for v in placed if priority[v] == 3) <= \
                min(made[v]["t"] for v in placed if priority[v] <= 1)
            for v in left:  # left PENDING, where oned's scheduler is the backstop
                assert "<STATE>1</STATE>" in call(url, "one.vm.info", v)


def test_constrained_vms_are_left_to_the_scheduler(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **lab_options(window_s=3.0)) as lab:
        url = lab.rpc_url
        plain = [call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(2)]
        required = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING",
                                               "USER_TEMPLATE": {"SCHED_REQUIREMENTS": "HYPERVISOR = \"kvm\""}})
        grouped = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING",
                                              "TEMPLATE": {"VMGROUP": {"VMGROUP_ID": "0", "ROLE": "db"}}})
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as stack:
            kill_and_wait_error(url, 0)
            inc = stack.report_host(0)
            closed = stack.wait_closed(inc, timeout_s=30)
            assert closed.status.value == "recovered", closed.detail
            running_on(url, [*plain, required, grouped])
            by = {c["vm"]: c["by"] for c in deploys(url) if not c["error"]}
            assert by[required] == by[grouped] == "scheduler"
            assert by[plain[0]] == by[plain[1]] == "api"
            assert not [c for c in deploys(url) if c["by"] == "api" and c["vm"] in (required, grouped)]
            records = stack.store.vm_records(inc)
            assert records[required]["placement_detail"] == "SCHED_REQUIREMENTS"
            assert records[grouped]["placement_detail"] == "VM group"


def test_placement_scheduler_keeps_the_scheduler_placing(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **lab_options(window_s=1.0)) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(4)]
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"},
                          clusters={0: {"placement": "scheduler"}}) as stack:
            kill_and_wait_error(url, 0)
            inc = stack.report_host(0)
            assert stack.wait_closed(inc, timeout_s=30).status.value == "recovered"
            running_on(url, vms)
            assert {c["by"] for c in deploys(url)} == {"scheduler"}
            assert all("placement" not in r for r in stack.store.vm_records(inc).values())


def test_the_scheduler_winning_the_race_leaves_no_error_and_no_double_deploy(tmp_path: Path,
                                                                            redis_url: str) -> None:
    # The fast profile places PENDING VMs on the lab's next tick (20 ms): oneha races it for every VM.
    with running_lab(hosts=4, **FAST_LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(12)]
        with worker_stack(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as stack:
            kill_and_wait_error(url, 1)
            inc = stack.report_host(1)
            closed = stack.wait_closed(inc, timeout_s=30)
            assert closed.status.value == "recovered", closed.detail
            running_on(url, vms)
            made = [c["vm"] for c in deploys(url) if not c["error"]]
            assert sorted(made) == sorted(vms)  # each deployed exactly once, by one of the two
            records = stack.store.vm_records(inc)
            assert all(r["result"] == "recovered" for r in records.values())
            assert {r["placement"] for r in records.values()} <= {"oneha", "scheduler"}
            assert not [e for e in stack.store.log(inc) if e.get("error")]


# The flows as plain functions, to put the scheduler's deploy (or a lost answer) exactly where it hurts -------------
def recover_in_process(tmp_path: Path, redis_url: str, lab: Any, monkeypatch: pytest.MonkeyPatch,
                       wrap: Any, other_incident: int | None = None
                       ) -> tuple[int, dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Host 0's VMs recovered by the flows called in this process; `wrap(real_deploy)` replaces the OnedClient's
    `vm_deploy`. Returns (incident, VM records, its audit log)."""
    from oneha.incidents import Kind
    from oneha.settings import load_settings
    from oneha.workers.host_flow import recover_host
    from oneha.workers.runtime import Runtime
    from oneha.workers.vm_task import recover_host_vm
    from tests.workerkit import write_config

    url = lab.rpc_url
    monkeypatch.setenv("ONEHA_LAB_URL", url)  # the lab's fence command
    sent: list[Any] = []
    settings = load_settings(write_config(tmp_path, redis_url, url, policy={"host_action": "recreate"}))
    rt = Runtime.build(settings, send=lambda name, args, queue: sent.append(args))
    try:
        monkeypatch.setattr(rt.oned.client, "vm_deploy", wrap(rt.oned.client.vm_deploy))
        kill_and_wait_error(url, 0)
        if other_incident is not None:  # an incident about another host (suspected, never dispatched here)
            rt.store.report(Kind.HOST, other_incident, 0, 3600.0, "test")
        inc = rt.store.report(Kind.HOST, 0, 0, 0.0, "test").incident_id
        assert recover_host(rt, inc) == "dispatched"
        assert [recover_host_vm(rt, inc, vid) for _, vid in sent] == ["recovered"] * len(sent)
        return inc, rt.store.vm_records(inc), rt.store.log(inc)
    finally:
        rt.redis.close()


def test_scheduler_first_between_read_and_deploy_is_no_error(tmp_path: Path, redis_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with running_lab(hosts=3, **lab_options(window_s=60.0)) as lab:
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(2)]

        def scheduler_first(real: Any) -> Any:
            def deploy(vm_id: int, host_id: int, enforce: bool, ds_id: int) -> None:
                other = 2 if host_id == 1 else 1  # the scheduler's plan action lands first, on the other host
                lab.cloud.vm_deploy(vm_id, other, enforce=True, by="scheduler")
                real(vm_id, host_id, enforce, ds_id)  # refused: ACTION, the VM is no longer PENDING

            return deploy

        _, records, log = recover_in_process(tmp_path, redis_url, lab, monkeypatch, scheduler_first)
        assert all(r["result"] == "recovered" and r["placement"] == "scheduler" for r in records.values())
        assert all(r["placement_detail"].startswith("placed by oned's scheduler first") for r in records.values())
        assert not [e for e in log if e.get("error")]
        calls = deploys(lab.rpc_url)
        assert sorted(c["vm"] for c in calls if not c["error"]) == sorted(vms)  # one deploy each: the scheduler's
        assert all(c["by"] == "api" for c in calls if c["error"])
        running_on(lab.rpc_url, vms)


def test_a_deploy_whose_answer_is_lost_is_read_back_not_sent_again(tmp_path: Path, redis_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    with running_lab(hosts=3, **lab_options(window_s=60.0)) as lab:
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(2)]

        def answer_lost(real: Any) -> Any:
            def deploy(vm_id: int, host_id: int, enforce: bool, ds_id: int) -> None:
                real(vm_id, host_id, enforce, ds_id)
                raise requests.ReadTimeout("the answer was lost")  # applied, but oneha cannot know

            return deploy

        _, records, _ = recover_in_process(tmp_path, redis_url, lab, monkeypatch, answer_lost)
        assert all(r["placement"] == "oneha" for r in records.values()), records
        calls = deploys(lab.rpc_url)
        assert sorted(c["vm"] for c in calls) == sorted(vms) and {c["by"] for c in calls} == {"api"}
        running_on(lab.rpc_url, vms)


def test_a_deploy_oned_never_answers_is_not_tried_on_another_host(tmp_path: Path, redis_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """oned keeps a `one.vm.deploy` past `oned.abandon_after_s`: it may still apply it, so oneha deploys the VM
    nowhere else (left to the scheduler, alerted); when oned gets to the call, the VM runs once, on that host."""
    from oneha.incidents import Kind
    from oneha.settings import load_settings
    from oneha.workers.host_flow import recover_host
    from oneha.workers.runtime import Runtime
    from oneha.workers.vm_task import recover_host_vm
    from tests.workerkit import write_config

    with running_lab(hosts=3, **lab_options(window_s=60.0)) as lab:
        url = lab.rpc_url
        vm_id = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        monkeypatch.setenv("ONEHA_LAB_URL", url)  # the lab's fence command
        oned = {"read_timeout_s": 0.3, "connect_timeout_s": 0.3, "abandon_after_s": 1.0}
        settings = load_settings(write_config(tmp_path, redis_url, url, policy={"host_action": "recreate"},
                                              oned=oned))
        sent: list[Any] = []
        rt = Runtime.build(settings, send=lambda name, args, queue: sent.append(args))
        try:
            kill_and_wait_error(url, 0)
            call(url, "lab.faults", {"hang_methods": ["one.vm.deploy"]})
            try:
                inc = rt.store.report(Kind.HOST, 0, 0, 0.0, "test").incident_id
                assert recover_host(rt, inc) == "dispatched"
                assert [recover_host_vm(rt, inc, vid) for _, vid in sent] == ["recovered"]
                deploys_sent = call(url, "lab.stats")["calls"].get("one.vm.deploy", 0)
                record = rt.store.vm_records(inc)[vm_id]
                alerts = [e for e in rt.store.log(inc) if e.get("event") == "alert"]
            finally:
                call(url, "lab.faults", {"hang_methods": []})
        finally:
            rt.redis.close()
        o = running_on(url, [vm_id])
    assert deploys_sent == 1, f"deploy sent {deploys_sent} times"
    assert record["placement"] == "scheduler" and "never answered" in record["placement_detail"], record
    assert alerts and len(o["running"][str(vm_id)]) == 1


def test_never_onto_a_host_another_open_incident_is_about(tmp_path: Path, redis_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with running_lab(hosts=3, **lab_options(window_s=60.0)) as lab:
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(4)]
        _, records, _ = recover_in_process(tmp_path, redis_url, lab, monkeypatch, lambda real: real,
                                           other_incident=1)
        assert {r["placement_host"] for r in records.values()} == {2}  # host 1 is emptier, but in question
        o = running_on(lab.rpc_url, vms)
        assert {o["running"][str(v)][0] for v in vms} == {2}


# The pure choice -------------------------------------------------------------------------------------------------
def vm(cpu: str = "1", memory: str = "512", user: dict[str, str] | None = None, vectors: frozenset[str] = frozenset(),
       pin: str = "") -> VmView:
    return VmView(7, "vm", VmState.PENDING, LcmState.LCM_INIT, 0, "h0", 0, cluster_id=0, user_template=user or {},
                  template={"CPU": cpu, "MEMORY": memory}, template_vectors=vectors, pin_policy=pin)


def host(hid: int, free_slots: int, cluster: int = 0, state: HostState = HostState.MONITORED,
         template: dict[str, str] | None = None) -> HostView:
    return HostView(hid, f"h{hid}", state, cluster, template=template or {}, max_cpu=800,
                    cpu_usage=800 - 100 * free_slots, max_mem=8 * 524288, mem_usage=(8 - free_slots) * 524288)


def test_scheduler_reason_names_what_oneha_does_not_evaluate() -> None:
    assert scheduler_reason(vm()) is None
    assert scheduler_reason(vm(user={"SCHED_REQUIREMENTS": "ID = 3"})) == "SCHED_REQUIREMENTS"
    assert scheduler_reason(vm(user={"SCHED_REQUIREMENTS": "  "})) is None
    assert scheduler_reason(vm(user={"SCHED_DS_REQUIREMENTS": "ID = 100"})) == "SCHED_DS_REQUIREMENTS"
    assert scheduler_reason(vm(vectors=frozenset({"VMGROUP"}))) == "VM group"
    assert scheduler_reason(vm(vectors=frozenset({"PCI", "DISK"}))) == "PCI devices"
    assert scheduler_reason(vm(vectors=frozenset({"TOPOLOGY"}), pin="CORE")) == "NUMA pinning"
    assert scheduler_reason(vm(vectors=frozenset({"TOPOLOGY"}), pin="NONE")) is None
    assert scheduler_reason(vm(cpu="")) == "no CPU or MEMORY in its template"


def test_candidate_hosts_most_free_first_within_the_cluster_and_room() -> None:
    hosts = [host(0, 8), host(1, 2), host(2, 5), host(3, 8, cluster=1), host(4, 8, state=HostState.DISABLED),
             host(5, 8, state=HostState.ERROR), host(6, 8, template={"PUBLIC_CLOUD": "YES"}), host(7, 6),
             host(8, 0), host(9, 8, state=HostState.OFFLINE), host(10, 8, state=HostState.INIT)]
    rooms = candidate_hosts(vm(), hosts, cluster_id=0, failed_host_id=0, blocked={7}, reserved={2: (400, 0)})
    assert [r.host_id for r in rooms] == [1, 2]  # 2 has 5 free slots, 4 of them reserved: 1 left (< 2 on host 1)
    assert [r.host_id for r in candidate_hosts(vm(cpu="3"), hosts, 0, 0, set(), {})] == [7, 2]
    assert candidate_hosts(vm(memory="8192"), hosts, 0, 0, set(), {}) == []


def test_reservations_keep_parallel_placements_within_the_room_oned_showed(redis_client: Any) -> None:
    """enforce is a check, not a reservation: two workers that read the same host share must not both take its last
    slot. Reservations newer than the read count against it; older ones (oned counts them by then) do not."""
    from types import SimpleNamespace

    from oneha.keys import Keys
    from oneha.workers.placement import Room, reserve, reserved_since, unreserve

    flow: Any = SimpleNamespace(rt=SimpleNamespace(redis=redis_client, keys=Keys("t"), settings=SimpleNamespace(
        worker=SimpleNamespace(placement_reservation_s=30.0))))
    a, b, c = (replace(vm(), id=i) for i in (1, 2, 3))
    room = Room(5, 200, 2 * 524288, 0.25)  # two slots free in the read
    read_at = time.time() - 1
    assert reserve(flow, a, room, (200, 2 * 524288), read_at)
    assert reserve(flow, a, room, (200, 2 * 524288), read_at)  # the same VM again: its own room is not counted
    assert reserve(flow, b, room, (200, 2 * 524288), read_at)
    assert not reserve(flow, c, room, (200, 2 * 524288), read_at)  # the host is full for this read
    assert reserved_since(flow, [5, 6], read_at) == {5: (200, 2 * 524288), 6: (0, 0)}
    assert reserve(flow, c, room, (200, 2 * 524288), time.time() + 1)  # a read newer than both: oned counts them
    unreserve(flow, b, 5)
    assert reserved_since(flow, [5], read_at) == {5: (200, 2 * 524288)}  # a and c


def test_lab_deploy_follows_oned() -> None:
    """`one.vm.deploy` in the lab as in VirtualMachineAPI.cc / HostShare.cc: PENDING/HOLD/STOPPED/UNDEPLOYED only,
    never onto an OFFLINE host (any other state is accepted), enforce = a CPU/memory check; every deploy logged."""
    from tests.labkit import LabCallError

    with running_lab(hosts=3, capacity=2, profile=held_scheduler(60.0)) as lab:
        url = lab.rpc_url
        running = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"})
        big = call(url, "lab.vm.create", {"STATE": "PENDING", "CPU": "1.5"})
        small = [call(url, "lab.vm.create", {"STATE": "PENDING"}) for _ in range(2)]
        with pytest.raises(LabCallError) as refused:
            call(url, "one.vm.deploy", running, 2, True, -1)
        assert refused.value.code == 0x800  # not PENDING: the scheduler (or anyone) placed it first
        call(url, "one.host.status", 2, 2)  # OFFLINE
        with pytest.raises(LabCallError, match="offline"):
            call(url, "one.vm.deploy", small[0], 2, False, -1)
        call(url, "one.host.status", 0, 1)  # DISABLED: oned accepts it (oneha itself only picks MONITORED hosts)
        call(url, "one.vm.deploy", small[0], 0, True, -1)
        with pytest.raises(LabCallError, match="does not fit"):  # host 1: 1 of 2 slots used, 1.5 CPU asked
            call(url, "one.vm.deploy", big, 1, True, -1)
        call(url, "one.vm.deploy", big, 1, False, -1)  # without enforce: no check
        calls = call(url, "lab.deploys")
        assert [(c["vm"], c["host"], bool(c["error"]), c["by"]) for c in calls] == [
            (running, 2, True, "api"), (small[0], 2, True, "api"), (small[0], 0, False, "api"),
            (big, 1, True, "api"), (big, 1, False, "api")]
        share = host_share(url)[1]
        assert share.cpu_usage == 250 and share.max_cpu == 200  # over capacity: only enforce prevents it
