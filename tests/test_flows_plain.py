"""The flows as plain functions: a `Runtime` built in the test, a real Redis, the lab cloud (real XML-RPC, real
pyone), the lab's fence command, and no Celery worker process. The tasks a flow sends are collected and run by the
test, in order, so each step's effect is seen directly.

"None twice, nothing lost" from the lab's oracle; "acted once" from its timeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oneha.incidents import Kind, Status
from oneha.keys import TASK_RECOVER_VM, VM_QUEUE
from oneha.settings import load_settings
from oneha.waiting import wait_until
from oneha.workers.host_flow import recover_host
from oneha.workers.runtime import Runtime
from oneha.workers.vm_flows import handle_vm_incident
from oneha.workers.vm_task import recover_host_vm
from tests.labkit import call, running_lab
from tests.workerkit import vm_timeline, write_config

LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}


@contextlib.contextmanager
def runtime(tmp_path: Path, redis_url: str, lab_url: str, **config: Any) -> Iterator[tuple[Runtime, list[Any]]]:
    """A Runtime as a worker process builds it, whose sender only collects (name, args, queue)."""
    sent: list[Any] = []
    settings = load_settings(write_config(tmp_path, redis_url, lab_url, **config))
    rt = Runtime.build(settings, send=lambda name, args, queue: sent.append((name, args, queue)))
    try:
        yield rt, sent
    finally:
        rt.redis.close()


def lcm_state(url: str, vid: int) -> int:
    return int(call(url, "one.vm.info", vid).split("<LCM_STATE>")[1].split("<")[0])


def test_host_flow_then_each_vm_task_recovers_every_vm_once(tmp_path: Path, redis_url: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        monkeypatch.setenv("ONEHA_LAB_URL", url)  # for the lab's fence command (`worker.fence_env`)
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING", "HA_PRIORITY": i % 3}) for i in range(6)]
        opted_out = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING", "HA": "NO"})
        call(url, "lab.host.kill", 1)
        wait_until(lambda: "<STATE>3</STATE>" in call(url, "one.host.info", 1), 10, what="host 1 in ERROR")
        with runtime(tmp_path, redis_url, url, policy={"host_action": "recreate"}) as (rt, sent):
            inc = rt.store.report(Kind.HOST, 1, 0, 0.0, "test").incident_id
            assert recover_host(rt, inc) == "dispatched"
            assert {(name, queue) for name, _, queue in sent} == {(TASK_RECOVER_VM, VM_QUEUE)}
            order = [args[1] for _, args, _ in sent]
            priority = {v: i % 3 for i, v in enumerate(vms)}
            assert order == sorted(vms, key=lambda v: (-priority[v], v))  # HA_PRIORITY first; HA = NO left out
            assert recover_host(rt, inc) == "redispatched"  # a second copy of the host task acts on nothing
            results = [recover_host_vm(rt, inc, vid) for vid in order]
            assert results == ["recovered"] * len(vms)
            closed = rt.store.get(inc)
            assert closed is not None and closed.status is Status.RECOVERED, closed
            assert recover_host_vm(rt, inc, order[0]) == "closed"  # a redelivered VM task changes nothing

        def all_running() -> dict[str, Any] | None:
            o = call(url, "lab.oracle")
            return o if all(o["running"].get(str(v)) for v in vms) else None

        o = wait_until(all_running, 20, what="every VM running again")
    assert o["duplicates"] == []
    assert all(o["running"][str(v)] != [1] for v in vms)
    assert {v: vm_timeline(o, v).count("ACTIVE/CLEANUP_RESUBMIT") for v in vms} == {v: 1 for v in vms}
    assert "ACTIVE/CLEANUP_RESUBMIT" not in vm_timeline(o, opted_out)


def test_vm_failure_flow_recreates_once_and_a_rerun_only_closes(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        vid = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(url, "lab.vm.fail", vid, "BOOT_FAILURE", False)
        wait_until(lambda: lcm_state(url, vid) == 36, 10, what="BOOT_FAILURE")
        with runtime(tmp_path, redis_url, url, policy={"vm_failure_action": "recreate"}) as (rt, _):
            inc = rt.store.report(Kind.VM_FAILURE, vid, 0, 0.0, "test", token="0").incident_id
            assert handle_vm_incident(rt, inc) == "recovered"
            closed = rt.store.get(inc)
            assert closed is not None and closed.status is Status.RECOVERED, closed
            assert rt.store.vm_records(inc)[vid]["action"] == "recreate"
            assert handle_vm_incident(rt, inc) == "closed"
        wait_until(lambda: call(url, "lab.oracle")["running"].get(str(vid)), 10, what="VM running again")
        o = call(url, "lab.oracle")
    assert vm_timeline(o, vid).count("ACTIVE/CLEANUP_RESUBMIT") == 1
    assert o["duplicates"] == []


def test_vm_crash_flow_resumes_on_its_healthy_host(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        vid = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(url, "lab.vm.crash", vid, "crashed")
        wait_until(lambda: lcm_state(url, vid) == 16, 10, what="UNKNOWN")
        with runtime(tmp_path, redis_url, url) as (rt, _):
            inc = rt.store.report(Kind.VM_CRASH, vid, 0, 0.0, "test", token="0").incident_id
            rt.store.pause("test")
            assert handle_vm_incident(rt, inc) == "held"  # paused: held and looked at again, nothing done
            assert rt.store.get(inc).status is Status.HELD  # type: ignore[union-attr]
            rt.store.resume()
            rt._pause_seen = (-1e9, None)  # the pause flag is cached for worker.pause_check_s per process
            assert handle_vm_incident(rt, inc) == "recovered"
            closed = rt.store.get(inc)
            assert closed is not None and closed.status is Status.RECOVERED, closed
        o = call(url, "lab.oracle")
    assert o["running"][str(vid)] == [0]
    assert vm_timeline(o, vid).count("ACTIVE/BOOT_UNKNOWN") == 1
