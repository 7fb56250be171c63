"""The whole oneha stack on one machine: lab cloud, Redis, subscriber, workers and Flower, started and stopped as one.

Everything but the lab cloud runs as a child process in its own process group, so a stop (or Ctrl-C) reaches every
process it started, and nothing is left running or listening afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from oneha.keys import Keys
from oneha.lab import detection
from oneha.lab.sim import LabCloud
from oneha.redis_server import RedisServer, free_port
from oneha.waiting import wait_until


@dataclass
class StackOptions:
    hosts: int = 8
    vms: int = 40
    clusters: int = 2
    workers: int = 2
    worker_concurrency: int = 8
    port: int = 2633
    events_port: int = 2101
    flower_port: int = 5555
    redis_url: str | None = None  # use this Redis instead of starting one
    monitoring_interval_s: float = 2.0
    step_delay_s: float = 0.2
    host_grace_s: float = 3.0
    vm_crash_grace_s: float = 2.0
    reconcile_interval_s: float = 5.0
    flower: bool = True
    dry_run: bool = False
    detection: bool = True  # every host's management side + two `oneha detect` (lab/detection.py), where possible


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class Stack:
    """Start with `with Stack(options) as stack:`; `stack.lab`, `stack.redis_url`, `stack.flower_url`, ..."""

    options: StackOptions = field(default_factory=StackOptions)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="oneha-lab-")))
    notices: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    lab: LabCloud | None = None
    redis: RedisServer | None = None
    redis_url: str = ""
    flower_url: str = ""
    flower_auth: tuple[str, str] = ("oneha", "")
    detection: bool = False  # detection runs (options.detection, and the machine allows it)

    # Start -----------------------------------------------------------------------------------------------------
    def start(self) -> Stack:
        try:
            self._start_lab()
            self._start_redis()
            config = self._write_config()
            env = self._child_env(config)
            self._spawn("subscriber", [sys.executable, "-m", "oneha", "subscribe"], env)
            for i in range(self.options.workers):
                self._spawn(f"worker-{i + 1}", self._worker_argv(i), env)
            if self.detection:
                for i in range(len(detection.DETECTORS)):
                    self._spawn(f"detector-{i + 1}", [sys.executable, "-m", "oneha", "detect"],
                                {**env, **detection.detector_env(i)})
            if self.options.flower:
                self._start_flower(env)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_lab(self) -> None:
        o = self.options
        why_not = detection.unavailable() if o.detection else None
        if why_not is not None:
            self.notices.append(f"no detection in this lab: {why_not}; oned's ERROR path only")
        self.detection = o.detection and why_not is None
        monitoring_s = max(o.monitoring_interval_s, detection.ONED_DETECTION_S) if self.detection else \
            o.monitoring_interval_s
        self.lab = LabCloud(hosts=o.hosts, vms=o.vms, clusters=o.clusters, monitoring_interval_s=monitoring_s,
                            step_delay_s=o.step_delay_s,
                            host_side=detection.host_side_options() if self.detection else None)
        self.lab.start(port=self._port("oned XML-RPC", o.port), events_port=self._port("ZeroMQ events", o.events_port))

    def _start_redis(self) -> None:
        if self.options.redis_url:
            self.redis_url = self.options.redis_url
            return
        self.redis = RedisServer.start()
        self.redis_url = self.redis.url

    def _port(self, what: str, wanted: int) -> int:
        """The wanted port if free, else a free one, said out loud (never a silent surprise)."""
        if wanted and _port_free(wanted):
            return wanted
        chosen = free_port()
        if wanted:
            self.notices.append(f"port {wanted} ({what}) is in use: using {chosen} instead")
        return chosen

    def _write_config(self) -> Path:
        assert self.lab is not None
        o = self.options
        auth = self.workdir / "one_auth"
        auth.write_text(self.lab.session + "\n")
        auth.chmod(0o600)
        fence = [sys.executable, "-m", "oneha", "lab", "fence-command"]
        if self.detection:  # through the hosts' Redfish BMCs: a dead BMC cannot fence (the lab's command always could)
            fence = detection.fence_command()
        config = self.workdir / "oneha.toml"
        text = _CONFIG.format(
            endpoint=self.lab.rpc_url, auth=auth, redis=self.redis_url, events=self.lab.events_url,
            grace=o.host_grace_s, crash_grace=o.vm_crash_grace_s, fence=_toml_list(fence),
            reconcile=o.reconcile_interval_s, dry_run=str(o.dry_run).lower(),
        )
        if self.lab.host_side is not None:
            text += detection.config_section(self.lab.host_side.heartbeat_dir)
        config.write_text(text)
        return config

    def _child_env(self, config: Path) -> dict[str, str]:
        assert self.lab is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
        env.update(ONEHA_CONFIG=str(config), ONE_AUTH=str(self.workdir / "one_auth"),
                   ONEHA_LAB_URL=self.lab.rpc_url, PYTHONUNBUFFERED="1")
        if self.lab.host_side is not None:
            env["ONEHA_FENCE_CRED_DIR"] = str(self.lab.host_side.cred_dir)
        return env

    def _worker_argv(self, index: int) -> list[str]:
        return [sys.executable, "-m", "oneha", "worker", "--concurrency", str(self.options.worker_concurrency),
                "--hostname", f"lab-worker-{index + 1}@%h"]

    def _start_flower(self, env: dict[str, str]) -> None:
        port = self._port("Flower", self.options.flower_port)
        password = secrets.token_urlsafe(12)
        self.flower_auth = ("oneha", password)
        flower_env = {**env, "FLOWER_BASIC_AUTH": f"oneha:{password}"}  # env, not argv: ps shows argv
        argv = [sys.executable, "-m", "celery", "-A", "oneha.workers.app:app", "flower",
                "--address=127.0.0.1", f"--port={port}"]
        self._spawn("flower", argv, flower_env)
        self.flower_url = f"http://127.0.0.1:{port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.children.append(Child(name, process, log))

    # Checks ----------------------------------------------------------------------------------------------------
    def dead_children(self) -> list[str]:
        return [c.name for c in self.children if c.process.poll() is not None]

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # Stop ------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        for child in self.children:
            _signal_group(child.process, signal.SIGTERM)
        for child in self.children:
            try:
                child.process.wait(10)
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()
            _signal_group(child.process, signal.SIGKILL)  # grandchildren (worker pool processes), if any
            child.log.close()
        self.children.clear()
        if self.lab is not None:
            self.lab.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_ready(stack: Stack, timeout_s: float = 60.0) -> None:
    """Until the subscriber and every worker are up (or one of them died: then say which, with its log)."""
    import redis

    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        def ready() -> bool:
            if stack.dead_children():
                return True
            beats = {str(b) for b in client.hkeys(Keys().heartbeat)}
            detectors = all(client.exists(Keys().detect_view(detection.detector_env(i)["ONEHA_DETECT__INSTANCE"]))
                            for i in range(len(detection.DETECTORS))) if stack.detection else True
            return any(b.startswith("subscriber") for b in beats) and detectors and \
                sum(b.startswith("worker") for b in beats) >= stack.options.workers
        wait_until(ready, timeout_s, what="subscriber and workers to start")
    finally:
        client.close()
    dead = stack.dead_children()
    if dead:
        raise RuntimeError(f"{dead[0]} exited at start:\n{stack.log_tail(dead[0])}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


_CONFIG = """\
# Written by `oneha lab`: the lab cloud's endpoint, a private Redis, short grace periods for a demo.
[oned]
endpoint = "{endpoint}"
auth_file = "{auth}"
read_timeout_s = 5
max_concurrent_calls = 8

[redis]
url = "{redis}"

[subscriber]
zmq_endpoints = ["{events}"]
reconcile_interval_s = {reconcile}
full_scan_interval_s = {reconcile}
dispatch_interval_s = 0.2
metrics_port = 0

[worker]
dry_run = {dry_run}
fence_env = ["ONEHA_LAB_URL"]  # the lab's fence command needs its endpoint (fence commands get a minimal env)
task_lease_s = 20
confirm_timeout_s = 60
metrics_port = 0

[policy.default]
host_action = "recreate"
host_grace_s = {grace}
fencing = {fence}
fence_timeout_s = 10
vm_crash_grace_s = {crash_grace}
vm_failure_grace_s = 0

# Cluster 0 keeps its system datastore on shared storage: its VMs can be migrated away from a dead host.
[policy.clusters.0]
host_action = "migrate"
"""
