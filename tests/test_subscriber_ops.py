"""Operability: Redis restarted under a running subscriber, the CLI (config errors, SIGTERM), `oneha incidents`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from oneha import heartbeat
from oneha.incidents import IncidentStore, Kind, Status
from oneha.incidents_cli import incidents as incidents_cmd
from oneha.redis_server import RedisServer
from oneha.waiting import wait_until
from tests.test_subscriber_kit import host_message, incidents, metric, publisher, running, settings, sync

ONEHA = [sys.executable, "-c", "from oneha.cli import main; main()"]


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restart_under_a_running_subscriber(own_redis: RedisServer) -> None:
    url = own_redis.url
    with publisher() as (pub, endpoint), running(settings(url, [endpoint], host_grace_s=60),
                                                 ("zmq", "stream", "dispatcher")) as svc:
        sync(pub, svc)
        pub.send_multipart(list(host_message(1, "ERROR", 3)))
        wait_until(lambda: incidents(url), 5, what="first incident")
        own_redis.stop()
        for hid in range(10, 15):  # failures while Redis is down
            pub.send_multipart(list(host_message(hid, "ERROR", 3)))
        wait_until(lambda: len(svc.buffer) == 5, 10, what="events buffered")
        own_redis.restart()
        # Redis came back empty (no persistence in this test): the buffered failures must all be there.
        wait_until(lambda: {i.resource_id for i in incidents(url)} >= set(range(10, 15)), 15,
                   what="buffered failures reported")
        assert all(t.is_alive() for t in svc.threads)
        assert metric("oneha_subscriber_redis_errors_total", component="intake") >= 1


def test_buffer_overflow_is_counted(own_redis: RedisServer) -> None:
    base = settings(own_redis.url)
    small = base.model_copy(update={"subscriber": base.subscriber.model_copy(update={"buffer_events": 2})})
    with publisher() as (pub, endpoint):
        cfg = small.model_copy(update={"subscriber": small.subscriber.model_copy(update={"zmq_endpoints": [endpoint]})})
        with running(cfg) as svc:
            sync(pub, svc)
            dropped = metric("oneha_events_dropped_total", reason="buffer_full")
            own_redis.stop()
            for hid in range(20, 25):
                pub.send_multipart(list(host_message(hid, "ERROR", 3)))
            wait_until(lambda: metric("oneha_events_dropped_total", reason="buffer_full") >= dropped + 3, 10,
                       what="overflow counted")
            assert len(svc.buffer) == 2


def write_config(tmp_path: Path, redis_url: str, extra: str = "") -> Path:
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:secretpass\n")
    cfg = tmp_path / "oneha.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\n[oned]\nendpoint = "http://127.0.0.1:9/RPC2"\n'
                   f'auth_file = "{auth}"\nconnect_timeout_s = 0.5\n'
                   f'[subscriber]\nzmq_endpoints = ["tcp://127.0.0.1:9"]\nmetrics_port = 0\n'
                   f'reconcile_interval_s = 0.5\n{extra}')
    return cfg


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}


def test_bad_config_exits_2_with_a_message(tmp_path: Path, redis_url: str) -> None:
    bad = write_config(tmp_path, redis_url, "dispatch_interval_s = -1\n")
    for cmd in ("subscribe", "reconcile"):
        res = subprocess.run([*ONEHA, cmd, "--config", str(bad)], capture_output=True, text=True, env=env(),
                             timeout=30)
        assert res.returncode == 2 and "subscriber.dispatch_interval_s" in res.stderr, res.stderr
    missing = subprocess.run([*ONEHA, "subscribe", "--config", str(tmp_path / "nope.toml")], capture_output=True,
                             text=True, env=env(), timeout=30)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_sigterm_stops_cleanly_and_logs_no_secret(tmp_path: Path, redis_url: str) -> None:
    cfg = write_config(tmp_path, redis_url)
    proc = subprocess.Popen([*ONEHA, "subscribe", "--config", str(cfg)], stderr=subprocess.PIPE, text=True,
                            env=env())
    assert proc.stderr is not None
    lines: list[str] = []
    # Wait for a reconcile pass to fail against the dead oned endpoint (it must keep running), then stop it.
    while not any("oned call failed" in line for line in lines):
        line = proc.stderr.readline()
        assert line, f"subscriber exited: {lines}"
        lines.append(line)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    lines += err.splitlines()
    assert proc.returncode == 0
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["msg"] == "subscriber stopped" for r in records)
    assert any(r["msg"] == "metrics listening" and r["port"] > 0 for r in records)
    assert not any("secretpass" in line for line in lines)


def test_incidents_cli_list_show_approve(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = IncidentStore(r)
    rep = store.report(Kind.HOST, 4, 0, 60, "test")
    store.record_vm(rep.incident_id, 12, {"action": "recreate", "result": "ok"})
    store.set_status(rep.incident_id, Status.HELD, "storm guard")
    cfg = write_config(tmp_path, redis_url)
    for key in [k for k in os.environ if k.startswith("ONEHA_")]:
        monkeypatch.delenv(key)
    runner = CliRunner()
    listed = runner.invoke(incidents_cmd, ["--config", str(cfg), "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [i["id"] for i in json.loads(listed.output)] == [rep.incident_id]
    heartbeat.beat(r, store.keys, "worker:w1@test")
    table = runner.invoke(incidents_cmd, ["--config", str(cfg)])
    assert table.exit_code == 0 and "held" in table.output
    assert "0 subscriber(s), 1 worker(s)" in table.output
    shown = runner.invoke(incidents_cmd, ["--config", str(cfg), "show", str(rep.incident_id), "--json"])
    data = json.loads(shown.output)
    assert data["vms"]["12"]["action"] == "recreate" and data["log"][0]["event"] == "opened"
    human = runner.invoke(incidents_cmd, ["--config", str(cfg), "show", str(rep.incident_id)])
    assert human.exit_code == 0 and "audit log" in human.output
    approved = runner.invoke(incidents_cmd, ["--config", str(cfg), "approve", str(rep.incident_id)])
    assert approved.exit_code == 0 and store.get(rep.incident_id).approved  # type: ignore[union-attr]
    assert runner.invoke(incidents_cmd, ["--config", str(cfg), "show", "999"]).exit_code == 1
