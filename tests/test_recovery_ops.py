"""Operability of the recovery pool end to end: dry-run changes nothing, a hanging oned hangs nothing, and the
worker's metrics endpoint reports what was done. Lab cloud, real Redis, `oneha worker` subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from oneha.incidents import Kind
from oneha.redis_server import RedisServer, free_port
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.workerkit import worker_stack

pytestmark = pytest.mark.slow
LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}
ONEHA = [sys.executable, "-m", "oneha"]


def host_in_error(url: str, host: int) -> bool:
    return "<STATE>3</STATE>" in call(url, "one.host.info", host)


def vm_states(url: str, vms: list[int]) -> dict[int, str]:
    timeline = call(url, "lab.oracle")["timeline"]
    last: dict[int, str] = {}
    for _, kind, vid, state in timeline:
        if kind == "vm" and vid in vms:
            last[vid] = state
    return last


def test_dry_run_decides_and_records_but_changes_nothing(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, **LAB) as lab:
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(5)]
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: host_in_error(lab.rpc_url, 0), 10, what="host 0 in ERROR")
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1, worker={"dry_run": True},
                          policy={"host_action": "recreate"}) as stack:
            incident = stack.wait_closed(stack.report_host(0))
            records = stack.store.vm_records(incident.id)
        assert sorted(records) == sorted(vms)
        assert {r["result"] for r in records.values()} == {"dry_run"}
        assert incident.status.value == "no_action" and "dry run" in incident.detail
        assert set(vm_states(lab.rpc_url, vms).values()) == {"ACTIVE/UNKNOWN"}  # nothing was touched
        assert call(lab.rpc_url, "lab.stats")["calls"].get("one.vm.recover", 0) == 0


def test_a_hanging_oned_times_out_and_the_incident_completes_when_it_answers(tmp_path: Path,
                                                                             redis_url: str) -> None:
    secret = "Pa55-never-logged"
    with running_lab(hosts=3, session=f"oneadmin:{secret}", **LAB) as lab:
        def lab_rpc(method: str, *args: object) -> Any:
            return call(lab.rpc_url, method, *args, session=lab.session)
        vms = [lab_rpc("lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(3)]
        lab_rpc("lab.host.kill", 0)
        wait_until(lambda: "<STATE>3</STATE>" in lab_rpc("one.host.info", 0), 10, what="host 0 in ERROR")
        oned = {"read_timeout_s": 0.5, "call_attempts": 2}
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1, oned=oned, session=lab.session,
                          env={"ONEHA_LAB_SESSION": lab.session},  # for the lab's fence command
                          policy={"host_action": "recreate"}) as stack:
            lab_rpc("lab.faults", {"hang": True})
            try:
                incident_id = stack.report_host(0)
                wait_until(lambda: "timed out" in stack.workers.logs().lower() or
                           "timeout" in stack.workers.logs().lower(), 30, what="an oned call to time out")
                assert stack.store.get(incident_id).status.is_open  # type: ignore[union-attr]
            finally:
                lab_rpc("lab.faults", {"hang": False})
            incident = stack.wait_closed(incident_id, timeout_s=90)
            logs = stack.workers.logs()
        assert incident.status.value == "recovered", incident
        # timeouts and retries were logged, the credentials never (nor in the audit trail)
        assert "timeout" in logs.lower() and secret not in logs
        assert secret not in str(stack.store.log(incident.id))
        assert sorted(stack.store.vm_records(incident.id)) == sorted(vms)


def test_worker_metrics_report_recoveries_fencing_and_oned_calls(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    with running_lab(hosts=3, **LAB) as lab:
        for _ in range(2):
            call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: host_in_error(lab.rpc_url, 0), 10, what="host 0 in ERROR")
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1, worker={"metrics_port": port},
                          policy={"host_action": "recreate"}) as stack:
            stack.wait_closed(stack.report_host(0))

            def scraped() -> str | None:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                return text if 'oneha_recoveries_total{action="recreate",kind="host",result="recovered"} 2.0' \
                    in text else None
            text = wait_until(scraped, 10, what="the recoveries in the worker's metrics")
        assert 'oneha_fence_total{result="fenced"} 1.0' in text
        assert 'oneha_oned_call_seconds_count{method="vm.recover"}' in text or \
            'oneha_oned_call_seconds_count{method="one.vm.recover"}' in text, text
        assert "oneha_time_to_recover_seconds_count" in text


def test_vm_unknown_on_a_disabled_host_is_left_alone_and_alerted(tmp_path: Path, redis_url: str) -> None:
    """oned never declares a DISABLED host ERROR: its UNKNOWN VMs cannot be confirmed dead, so none is resumed
    or recreated (that could run it twice) — the incident says why and the audit trail carries an alert."""
    with running_lab(hosts=3, **LAB) as lab:
        vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(lab.rpc_url, "one.host.status", 0, 1)  # disabled by an operator
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: vm_states(lab.rpc_url, [vid]).get(vid) == "ACTIVE/UNKNOWN", 10, what="VM UNKNOWN")
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1) as stack:
            incident = stack.wait_closed(stack.report_vm(Kind.VM_CRASH, vid))
            log = stack.store.log(incident.id)
        assert incident.status.value == "no_action" and "not confirmed dead" in incident.detail, incident
        assert any(e["event"] == "alert" and "DISABLED" in e["message"] for e in log), log
        assert vm_states(lab.rpc_url, [vid])[vid] == "ACTIVE/UNKNOWN"
        assert "<STATE>4</STATE>" in call(lab.rpc_url, "one.host.info", 0)  # still DISABLED, never ERROR


def test_incidents_of_objects_deleted_from_oned_close_instead_of_looping(tmp_path: Path, redis_url: str) -> None:
    """A host or VM removed from oned after its incident opened: closed as no_action, not re-dispatched for ever."""
    with running_lab(hosts=2, **LAB) as lab, worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1) as stack:
        host = stack.wait_closed(stack.report_host(77))
        vm = stack.wait_closed(stack.report_vm(Kind.VM_FAILURE, 9999, token="0"))
    assert host.status.value == "no_action" and "no longer exists" in host.detail, host
    assert vm.status.value == "no_action" and "no longer exists" in vm.detail, vm


def test_redis_restarted_under_running_workers_mid_recovery(tmp_path: Path) -> None:
    """Redis (broker and state, persistent) restarts while a host's VMs are being recovered: the workers survive,
    the incident completes, and no VM is acted on twice."""
    server = RedisServer.start(persist=True)
    try:
        with running_lab(hosts=3, **LAB) as lab:
            url = lab.rpc_url
            vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(30)]
            call(url, "lab.host.kill", 1)
            wait_until(lambda: host_in_error(url, 1), 10, what="host 1 in ERROR")
            with worker_stack(tmp_path, server.url, url, workers=2, concurrency=2) as stack:
                call(url, "lab.faults", {"latency_ms": 60})
                incident = stack.report_host(1)
                wait_until(lambda: len(stack.store.vm_records(incident)) >= 4, 30, what="first VMs recovered")
                assert len(stack.store.vm_records(incident)) < len(vms), "too late: nothing left to interrupt"
                server.restart(down_s=3.0)  # long enough for flows to hit the outage, not only Celery
                closed = stack.wait_closed(incident, timeout_s=120)
                call(url, "lab.faults", {"latency_ms": 0})
                assert closed.status.value == "recovered", closed.detail
                assert all(p.poll() is None for p in stack.workers.procs), stack.workers.logs()[-3000:]
            oracle = call(url, "lab.oracle")
            assert oracle["duplicates"] == [] and not set(map(str, vms)) & set(map(str, oracle["lost"]))
            acted = [state for _, kind, vid, state in oracle["timeline"]
                     if kind == "vm" and vid in vms and state == "ACTIVE/CLEANUP_RESUBMIT"]
            assert len(acted) == len(vms)  # each VM recreated exactly once
    finally:
        server.stop()


def test_pause_holds_every_action_until_resume(tmp_path: Path, redis_url: str) -> None:
    """Maintenance: once recovery is paused, a recovery under way stops before its next action and a host that
    fails meanwhile is neither fenced nor recovered; `resume` finishes both, each VM recreated once."""
    with running_lab(hosts=5, **LAB) as lab:
        url = lab.rpc_url
        first = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(20)]
        second = [call(url, "lab.vm.create", {"HOST": 2, "STATE": "RUNNING"}) for _ in range(5)]
        with worker_stack(tmp_path, redis_url, url, workers=1, concurrency=2,
                          worker={"storm_max_share": 1.0, "storm_recheck_s": 0.5}) as stack:
            def incidents_cli(*args: str) -> str:
                done = subprocess.run([*ONEHA, "incidents", "--config", str(tmp_path / "oneha.toml"), *args],
                                      capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stderr
                return done.stdout

            call(url, "lab.faults", {"latency_ms": 60})
            call(url, "lab.host.kill", 1)
            wait_until(lambda: host_in_error(url, 1), 10, what="host 1 in ERROR")
            a = stack.report_host(1)
            wait_until(lambda: len(stack.store.vm_records(a)) >= 2, 30, what="recovery under way")
            incidents_cli("pause", "--reason", "front-end maintenance")
            assert "RECOVERY PAUSED" in incidents_cli("list") and "front-end maintenance" in incidents_cli("list")

            def drained() -> bool:  # every VM task left has stopped at the gate
                stopped = {e["vm"] for e in stack.store.log(a) if e.get("event") == "paused"}
                pending = {int(v) for v in stack.client.smembers(stack.store.keys.incident_pending_vms(a))}
                return bool(pending) and pending <= stopped

            wait_until(drained, 30, what="VM tasks stopped by the pause")
            acted_while_pausing = len(stack.store.vm_records(a))
            assert acted_while_pausing < len(first), "the pause came too late to test anything"
            call(url, "lab.host.kill", 2)
            wait_until(lambda: host_in_error(url, 2), 10, what="host 2 in ERROR")
            b = stack.report_host(2)
            held = stack.wait_status(b, "held")
            assert "paused" in held.detail
            calls = call(url, "lab.stats")["calls"]
            assert calls.get("one.vm.recover", 0) == acted_while_pausing  # nothing acted since
            assert calls.get("lab.host.fence", 0) == 1  # host 1 only: host 2 was not fenced

            assert "resumed" in incidents_cli("resume")
            for inc in (a, b):
                closed = stack.wait_closed(inc, timeout_s=60)
                assert closed.status.value == "recovered", closed.detail
            call(url, "lab.faults", {"latency_ms": 0})
        o = call(url, "lab.oracle")
        assert o["duplicates"] == []
        acted = [vid for _, kind, vid, state in o["timeline"] if kind == "vm" and state == "ACTIVE/CLEANUP_RESUBMIT"]
        assert sorted(acted) == sorted(first + second)  # each VM recreated exactly once
