"""Helpers for the worker tests and the bench: a config file, `oneha worker` subprocesses, a dispatcher, incidents.

    with worker_stack(tmp_path, redis_url, lab, policy={...}) as stack:
        inc = stack.report_host(1)
        stack.wait_closed(inc)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from oneha import redisconn
from oneha.incidents import Incident, IncidentStore, Kind
from oneha.keys import Keys
from oneha.settings import Settings, load_settings
from oneha.waiting import wait_until

FENCE_LAB = [sys.executable, "-m", "oneha", "lab", "fence-command"]
LAB_FENCE_ENV = ["ONEHA_LAB_URL", "ONEHA_LAB_SESSION", "ONEHA_LAB_FENCE_FAIL"]  # what the lab's fence command reads


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(_toml(v, f"{prefix}.{k}" if prefix else str(k)))
    return "\n".join(out) + "\n"


def write_config(directory: Path, redis_url: str, oned_url: str, session: str = "oneadmin:opennebula",
                 policy: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 oned: dict[str, Any] | None = None, clusters: dict[int, dict[str, Any]] | None = None,
                 broker_url: str | None = None, subscriber: dict[str, Any] | None = None,
                 redis_options: dict[str, Any] | None = None) -> Path:
    """A test configuration: short leases and deadlines, fencing through the lab, credentials in a 0600 file."""
    auth = directory / "one_auth"
    auth.write_text(session + "\n")
    auth.chmod(0o600)
    data: dict[str, Any] = {
        "redis": {"url": redis_url, **(redis_options or {})},
        "oned": {"endpoint": oned_url, "auth_file": str(auth), "connect_timeout_s": 2.0, "read_timeout_s": 3.0,
                 "max_concurrent_calls": 8, "call_attempts": 6, "backoff_base_s": 0.02, "backoff_max_s": 0.3,
                 **(oned or {})},
        "worker": {"lock_ttl_s": 3.0, "task_lease_s": 4.0, "confirm_timeout_s": 15.0, "storm_recheck_s": 1.0,
                   "storm_max_hosts": 50, "metrics_port": 0, "fence_env": LAB_FENCE_ENV, **(worker or {})},
        "policy": {"default": {"host_grace_s": 0.0, "fencing": FENCE_LAB, "fence_timeout_s": 20.0,
                               "fence_attempts": 2, "vm_crash_grace_s": 0.0, **(policy or {})}},
    }
    if broker_url:
        data["broker"] = {"url": broker_url}
    if subscriber:
        data["subscriber"] = subscriber
    if clusters:
        data["policy"]["clusters"] = {str(c): v for c, v in clusters.items()}
    path = directory / "oneha.toml"
    path.write_text(_toml(data))
    return path


@dataclass
class WorkerPool:
    config: Path
    env: dict[str, str]
    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, n: int = 1, concurrency: int = 8, pool: str = "threads") -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            i = len(self.procs)
            log = open(self.logdir / f"worker{i}.log", "wb")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "oneha", "worker", "--config", str(self.config), "--concurrency",
                   str(concurrency), "--pool", pool, "--loglevel", "INFO", "--hostname", f"w{i}@test"]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            self.procs.append(proc)
            started.append(proc)
        return started

    def start_subscriber(self) -> subprocess.Popen[bytes]:
        """`oneha subscribe` with the same config and environment; stopped with the workers."""
        log = open(self.logdir / "subscriber.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "oneha", "subscribe", "--config", str(self.config)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc

    def wait_ready(self, client: redis.Redis, keys: Keys, n: int, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {self.logs()[-3000:]}")
            return sum(1 for k in client.hkeys(keys.heartbeat) if str(k).startswith("worker:")) >= n

        wait_until(ready, timeout_s, what=f"{n} workers ready")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("worker*.log")))


@dataclass
class Stack:
    settings: Settings
    store: IncidentStore
    client: redis.Redis
    workers: WorkerPool
    celery: Any
    lab_url: str

    def report_host(self, hid: int, cluster_id: int = 0) -> int:
        return self.store.report(Kind.HOST, hid, cluster_id, 0.0, "test").incident_id

    def report_vm(self, kind: Kind, vid: int, token: str = "", cluster_id: int = 0) -> int:
        return self.store.report(kind, vid, cluster_id, 0.0, "test", token=token).incident_id

    def send(self, name: str, args: list[Any], queue: str) -> None:
        self.celery.send_task(name, args=args, queue=queue)

    def wait_status(self, incident_id: int, *statuses: str, timeout_s: float = 60.0) -> Incident:
        def reached() -> Incident | None:
            inc = self.store.get(incident_id)
            return inc if inc is not None and inc.status.value in statuses else None

        try:
            return wait_until(reached, timeout_s, what=f"incident {incident_id} in {statuses}")
        except TimeoutError:
            inc = self.store.get(incident_id)
            raise AssertionError(f"incident {incident_id}: {inc}\nlog: {self.store.log(incident_id)[-15:]}\n"
                                 f"workers: {self.workers.logs()[-4000:]}") from None

    def wait_closed(self, incident_id: int, timeout_s: float = 60.0) -> Incident:
        return self.wait_status(incident_id, "recovered", "partial", "failed", "no_action", "cancelled",
                                timeout_s=timeout_s)


def run_dispatcher(store: IncidentStore, celery: Any, lease_s: float, stop: threading.Event) -> threading.Thread:
    """The subscriber's dispatcher (claim_due + send_task, also the watchdog of dead workers) in a thread."""
    from oneha.subscriber.dispatcher import Dispatcher

    dispatcher = Dispatcher(store, celery, lease_s, 0.05, stop)
    thread = threading.Thread(target=dispatcher.run, name="test-dispatcher", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def worker_stack(directory: Path, redis_url: str, lab_url: str, workers: int = 2, concurrency: int = 8,
                 env: dict[str, str] | None = None, dispatcher: bool = True, **config: Any) -> Iterator[Stack]:
    """Config + N `oneha worker` processes + a dispatcher thread, against a Redis and a lab."""
    from oneha.subscriber.dispatcher import make_celery

    path = write_config(directory, redis_url, lab_url, **config)
    settings = load_settings(path)
    client = redisconn.connect(settings.redis, decode_responses=True)  # redis:// or Sentinel
    keys = Keys(settings.redis.key_prefix)
    store = IncidentStore(client, keys)
    celery = make_celery(settings)
    wenv = {**os.environ, "ONEHA_LAB_URL": lab_url, "PYTHONUNBUFFERED": "1", **(env or {})}
    wenv.pop("ONEHA_CONFIG", None)
    pool = WorkerPool(path, wenv, directory)
    stop = threading.Event()
    thread = None
    try:
        pool.start(workers, concurrency)
        pool.wait_ready(client, keys, workers)
        if dispatcher:
            thread = run_dispatcher(store, celery, settings.worker.task_lease_s, stop)
        yield Stack(settings, store, client, pool, celery, lab_url)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
        pool.stop()
        client.close()


def vm_timeline(oracle: dict[str, Any], vid: int) -> list[str]:
    return [s for _, k, i, s in oracle["timeline"] if k == "vm" and i == vid]


def timeline_time(oracle: dict[str, Any], vid: int, state: str) -> float | None:
    return next((t for t, k, i, s in oracle["timeline"] if k == "vm" and i == vid and s == state), None)
