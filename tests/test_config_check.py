"""`oneha config check` checks the world against the lab: oned, credentials, version, Redis, broker, fencing,
metrics ports, OpenNebula's own host_error hook, ZeroMQ (issue 14). Real lab XML-RPC server, real pyone, real
Redis, real ZeroMQ."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.labkit import call, running_lab
from tests.workerkit import write_config

ONEHA = [sys.executable, "-m", "oneha"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
    return subprocess.run([*ONEHA, "config", "check", "--config", str(cfg), "--zmq-wait", "1", *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def lab_config(tmp: Path, redis_url: str, rpc_url: str, events_url: str, **kwargs: object) -> Path:
    cfg = write_config(tmp, redis_url, rpc_url, worker={"metrics_port": free_port()}, **kwargs)  # type: ignore[arg-type]
    with cfg.open("a") as f:
        f.write(f'[subscriber]\nzmq_endpoints = ["{events_url}"]\nmetrics_port = {free_port()}\n')
    return cfg


def lines_of(out: str, mark: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(mark)]


def test_a_ready_world_passes(tmp_path: Path, redis_url: str) -> None:
    with running_lab() as lab:
        cfg = lab_config(tmp_path, redis_url, lab.rpc_url, lab.events_url)
        res = check(cfg)
        as_json = check(cfg, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not lines_of(res.stdout, "✗"), res.stdout
    for name in ("oned reachable", "oned version", "oned credentials", "OpenNebula host_error hook", "redis",
                 "broker", "fencing (default)", "metrics port (worker)", "ZeroMQ"):
        assert any(line.startswith(f"✓ {name}") for line in res.stdout.splitlines()), (name, res.stdout)
    assert "7.4.0" in res.stdout and "accepted as oneadmin" in res.stdout
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is True and {c["status"] for c in doc["checks"]} <= {"ok", "warn"}


def test_what_prevents_recovery_fails_with_what_to_do(tmp_path: Path, redis_url: str) -> None:
    with running_lab() as lab:
        call(lab.rpc_url, "lab.hook.create", {"NAME": "host_error", "TYPE": "state", "COMMAND": "ft/host_error.rb",
                                              "ARGUMENTS": "$TEMPLATE -m -p 5", "RESOURCE": "HOST", "STATE": "ERROR"})
        cfg = lab_config(tmp_path, redis_url, lab.rpc_url, lab.events_url,
                         clusters={1: {"fencing": [str(tmp_path / "no_such_fence.sh")]}})
        text = cfg.read_text()
        default_fencing = next(line for line in text.splitlines() if line.startswith("fencing = ["))
        cfg.write_text(text.replace(default_fencing + "\n", "", 1))  # the default's; cluster 1 keeps its own
        res = check(cfg)
        as_json = json.loads(check(cfg, "--json").stdout)
    assert res.returncode == 1, res.stdout + res.stderr
    failed = "\n".join(lines_of(res.stdout, "✗"))
    assert "OpenNebula host_error hook: registered: hook 0 (host_error)" in failed and "onehook delete" in failed
    assert "fencing (default): not configured" in failed and 'fencing = "none"' in failed
    assert "no_such_fence.sh does not exist" in failed
    assert as_json["ok"] is False
    assert {c["name"] for c in as_json["checks"] if c["status"] == "fail"} == {
        "OpenNebula host_error hook", "fencing (default)", "fencing (cluster 1)"}


def test_unreachable_services_and_refused_credentials(tmp_path: Path) -> None:
    dead = free_port()
    with running_lab() as lab:
        cfg = lab_config(tmp_path, f"redis://127.0.0.1:{dead}/0", lab.rpc_url, f"tcp://127.0.0.1:{dead}",
                         session="oneadmin:wrong")
        res = check(cfg)
    assert res.returncode == 1
    failed = "\n".join(lines_of(res.stdout, "✗"))
    assert "oned credentials" in failed and "one_auth" in failed and "wrong" not in res.stdout
    assert "✗ redis: redis://127.0.0.1" in failed and "✗ broker" in failed
    assert any(line.startswith(f"! ZeroMQ tcp://127.0.0.1:{dead}: no connection") for line in res.stdout.splitlines())
    cfg.write_text(cfg.read_text().replace(lab.rpc_url, "ftp://oned.example/RPC2"))
    bad = check(cfg)
    assert bad.returncode == 2 and "oned.endpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_oned_down_and_a_busy_metrics_port(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        cfg = write_config(tmp_path, redis_url, f"http://127.0.0.1:{free_port()}/RPC2", worker={"metrics_port": port})
        res = check(cfg)
    assert res.returncode == 1
    assert lines_of(res.stdout, "✗ oned reachable"), res.stdout
    assert any(line.startswith("! metrics port (worker)") and "taken by another program" in line
               for line in res.stdout.splitlines()), res.stdout


def test_missing_credentials_file_is_named(tmp_path: Path, redis_url: str) -> None:
    cfg = write_config(tmp_path, redis_url, "http://127.0.0.1:2633/RPC2")
    (tmp_path / "one_auth").unlink()
    res = check(cfg)
    assert res.returncode == 1
    assert any(line.startswith("✗ oned credentials: cannot read oned credentials from") and "one_auth" in line
               for line in res.stdout.splitlines()), res.stdout


def test_detection_says_how_many_detectors_are_alive_and_what_each_heartbeat_promises(tmp_path: Path,
                                                                                       redis_url: str) -> None:
    """Warnings, never failures: without detection oned's ERROR path still recovers."""
    import redis

    from oneha.detect.quorum import Quorum
    from oneha.keys import Keys
    from oneha.timing_rule import Heartbeat

    beats = tmp_path / "heartbeats"
    beats.mkdir()
    (beats / "kvm1").write_bytes(Heartbeat("kvm1", 7, "b", 21.0).encode())
    (beats / "kvm2").write_bytes(Heartbeat("kvm2", 3, "b", 21.0, status="unarmed").encode())
    with running_lab() as lab:
        cfg = lab_config(tmp_path, redis_url, lab.rpc_url, lab.events_url)
        with cfg.open("a") as f:
            f.write(f'[detect]\nheartbeat_dir = "{beats}"\n')
        none_alive = check(cfg)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        for name in ("fe1", "fe2"):  # what a live detector publishes each round
            Quorum(r, Keys(), name, 30.0).publish({})
        two_alive = check(cfg)
    assert none_alive.returncode == 0, none_alive.stdout
    assert "! detectors: 0 alive, quorum 2: no fast detection" in none_alive.stdout
    assert "✓ detectors: 2 alive (fe1, fe2), quorum 2" in two_alive.stdout
    assert "! host heartbeats: 1 host(s) whose heartbeat can prove death; not: kvm2 (unarmed)" in two_alive.stdout
