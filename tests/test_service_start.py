"""Services at start: permanent configuration errors stop them with one line and exit 2 (the units do not restart
on 2); an oned that cannot be reached is transient and the service keeps running; several workers on one machine
each heartbeat and serve metrics (issue 14)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from oneha.keys import Keys
from oneha.lab.sim import LabCloud
from oneha.waiting import wait_until
from tests.labkit import FAST, running_lab
from tests.workerkit import write_config

ONEHA = [sys.executable, "-m", "oneha"]
SERVICES = (["subscribe"], ["reconcile"], ["worker", "--concurrency", "2"], ["detect"])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
    return {**env, **extra}


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (worker instances 1 and 2)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no pair of free ports")


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/RPC2"  # closed again: connection refused


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s[0])
def test_endpoint_that_is_not_a_url_exits_2_at_once(tmp_path: Path, redis_url: str, service: list[str]) -> None:
    cfg = write_config(tmp_path, redis_url, "ftp://oned.example/RPC2")
    res = subprocess.run([*ONEHA, *service, "--config", str(cfg)], capture_output=True, text=True,
                         env=clean_env(), timeout=30)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "oned.endpoint" in res.stderr and "http://" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s[0])
def test_rejected_credentials_exit_2_with_one_line(tmp_path: Path, redis_url: str, service: list[str]) -> None:
    with running_lab() as lab:
        cfg = write_config(tmp_path, redis_url, lab.rpc_url, session="oneadmin:wrong")
        res = subprocess.run([*ONEHA, *service, "--config", str(cfg)], capture_output=True, text=True,
                             env=clean_env(), timeout=30)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "refused" in lines[0] and "one_auth" in lines[0] and "wrong" not in lines[0]


def test_oned_down_at_start_is_transient_and_a_taken_metrics_port_costs_only_metrics(tmp_path: Path,
                                                                                      redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = write_config(tmp_path, redis_url, dead_endpoint())
        with cfg.open("a") as f:
            f.write(f"[subscriber]\nmetrics_port = {taken.getsockname()[1]}\n")
        proc = subprocess.Popen([*ONEHA, "subscribe", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=clean_env())
        try:
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            keys = Keys()
            wait_until(lambda: proc.poll() is not None or any(k.startswith("subscriber:")
                                                              for k in client.hkeys(keys.heartbeat)),
                       20, what="subscriber heartbeat")
            assert proc.poll() is None, "the subscriber must keep running while oned is unreachable"
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
    assert "not reachable at start" in err
    assert "metrics: cannot listen" in err


@pytest.mark.slow
def test_several_workers_on_one_machine_all_heartbeat(tmp_path: Path, redis_url: str) -> None:
    base = free_port_pair()
    with running_lab() as lab:
        cfg = write_config(tmp_path, redis_url, lab.rpc_url, worker={"metrics_port": base})
        procs = []
        # @1 and @2 as the unit starts them; a third without an instance clashes with @1's port on purpose.
        for i, instance in enumerate(("1", "2", None)):
            cmd = [*ONEHA, "worker", "--config", str(cfg), "--concurrency", "2", "--hostname", f"w{i}@test"]
            cmd += ["--instance", instance] if instance else []
            log = open(tmp_path / f"w{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env()))
        try:
            client = redis.Redis.from_url(redis_url, decode_responses=True)

            def workers_alive() -> int:
                assert all(p.poll() is None for p in procs), "a worker exited"
                return sum(1 for k in client.hkeys(Keys().heartbeat) if k.startswith("worker:"))

            wait_until(lambda: workers_alive() == 3, 40, what="three worker heartbeats")
            for port in (base, base + 1):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    assert b"oneha_" in resp.read()
            listed = subprocess.run([*ONEHA, "incidents", "--config", str(cfg)], capture_output=True, text=True,
                                    env=clean_env(), timeout=30)
            assert "3 worker(s)" in listed.stdout, listed.stdout + listed.stderr
            # whichever of @1 and the third started second says why it serves no metrics
            logs = [(tmp_path / f"w{i}.log").read_text(errors="replace") for i in (0, 2)]
            assert sum("cannot listen" in text for text in logs) == 1
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=20)


@pytest.mark.parametrize("service", ["subscribe", "reconcile"])
def test_credentials_refused_after_start_stop_with_2(tmp_path: Path, redis_url: str, service: str) -> None:
    """oned down at start (so the start check could not tell), then up with other credentials: exit 2, not a loop."""
    endpoint = dead_endpoint()
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    cfg = write_config(tmp_path, redis_url, endpoint, session="oneadmin:wrong")
    with cfg.open("a") as f:
        f.write("[subscriber]\nreconcile_interval_s = 0.3\nmetrics_port = 0\n")
    proc = subprocess.Popen([*ONEHA, service, "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_until(lambda: proc.poll() is not None or any(k.startswith("subscriber:")
                                                          for k in client.hkeys(Keys().heartbeat)),
                   20, what="service running")
        assert proc.poll() is None
        lab = LabCloud(**FAST).start(port=port)  # oned comes up, with other credentials than ours
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            lab.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err[-2000:]
    assert "permanent error" in err and "one_auth" in err and "wrong" not in err
