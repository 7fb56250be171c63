"""A worker never ends quietly: exit 0 only when asked to stop by a signal; any other end is non-zero, so systemd
(`Restart=always`, see test_deploy_units) restarts it. Real `oneha worker` processes and real redis-server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from oneha.keys import Keys
from oneha.redis_server import RedisServer
from oneha.settings import load_settings
from oneha.waiting import wait_until
from oneha.workers.cli import EXIT_UNASKED
from tests.workerkit import WorkerPool, write_config

pytestmark = pytest.mark.slow
NO_ONED = "http://127.0.0.1:9/RPC2"  # these workers never reach oned


def pool(tmp_path: Path, redis_url: str) -> WorkerPool:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ONEHA_CONFIG", None)
    return WorkerPool(write_config(tmp_path, redis_url, NO_ONED), env, tmp_path)


def exit_status(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    wait_until(lambda: proc.poll() is not None, timeout_s, what="the worker to exit")
    return int(proc.returncode)


def test_a_worker_that_stops_on_its_own_exits_non_zero_and_zero_only_when_signalled(tmp_path: Path,
                                                                                    redis_url: str) -> None:
    from oneha.subscriber.dispatcher import make_celery

    workers = pool(tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        unasked, signalled = workers.start(2, concurrency=2)
        workers.wait_ready(client, Keys(), 2)
        # Celery ends the worker without any signal (as when it gives up on its broker): not a clean stop.
        make_celery(load_settings(workers.config)).control.broadcast("shutdown", destination=["w0@test"])
        assert exit_status(unasked) == EXIT_UNASKED, workers.logs()[-2000:]
        assert "stopped without being asked" in workers.logs()
        signalled.send_signal(signal.SIGTERM)  # systemctl stop: a clean exit, not restarted
        assert exit_status(signalled) == 0
    finally:
        workers.stop()
        client.close()


def test_a_worker_rides_out_redis_killed_under_it_or_exits_non_zero(tmp_path: Path) -> None:
    server = RedisServer.start()
    workers = pool(tmp_path, server.url)
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_connect_timeout=0.5)
    try:
        (proc,) = workers.start(1, concurrency=2)
        workers.wait_ready(client, Keys(), 1)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        # While Redis is gone the worker retries its broker connection; it must not end with 0.
        with contextlib.suppress(TimeoutError):
            exit_status(proc, 3.0)
        status = proc.poll()
        assert status != 0, workers.logs()[-2000:]
        fresh = RedisServer.start(server.port)  # back, empty
        server.process = fresh.process
        if status is None:
            wait_until(lambda: any(str(k).startswith("worker:") for k in client.hkeys(Keys().heartbeat)), 20,
                       what="the worker beating on the new Redis")
            assert proc.poll() is None
    finally:
        workers.stop()
        client.close()
        server.stop()
