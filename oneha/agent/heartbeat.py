"""The heartbeat file on the shared storage: atomic, durable, and never allowed to block the agent's loop.

A write on a hung NFS mount can block in the kernel for minutes (uninterruptible: no timeout or signal ends it). So
each write runs in its own thread and the loop waits for it at most `timeout_s`: a write not done by then counts as
failed this beat, and while it hangs no second write is started (one stuck thread at most, never a pile). If it
completes later, it counts from the moment it started (the data landed after that moment), so a slow storage is not
mistaken for a lost one once it answers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("oneha.agent")


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Readers see the old file or the new one, never half of one: write a temporary file beside it, fsync it,
    rename it over the old one, fsync the directory (the rename itself must reach the storage). `sync=False` (the
    lab, whose "shared storage" is a local directory) skips the fsyncs."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if not sync:
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class HeartbeatWriter:
    def __init__(self, path: Path, write: Callable[[Path, bytes], None] = atomic_write) -> None:
        self.path = path
        self._write = write
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._last_ok: float | None = None
        self.last_error: str | None = None

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, data: bytes, started_at: float) -> bool:
        """Start writing `data` unless a write is still running (then False: this beat's write failed)."""
        with self._lock:
            if not self._idle.is_set():
                self.last_error = "the previous write has not finished (storage hung?)"
                return False
            self._idle.clear()
        threading.Thread(target=self._run, args=(data, started_at), name="oneha-agent-write", daemon=True).start()
        return True

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the running write; True if none runs any more."""
        return self._idle.wait(timeout_s)

    def last_success(self) -> float | None:
        """When the newest successful write started."""
        with self._lock:
            return self._last_ok

    def write(self, data: bytes, started_at: float, timeout_s: float) -> bool:
        """One bounded write: True only if this very write completed within `timeout_s`."""
        if not self.submit(data, started_at):
            return False
        return self.wait(timeout_s) and self.last_success() == started_at

    def _run(self, data: bytes, started_at: float) -> None:
        try:
            self._write(self.path, data)
        except OSError as exc:
            with self._lock:
                self.last_error = f"{self.path}: {exc.strerror or exc}"
        else:
            with self._lock:
                if self._last_ok is None or started_at > self._last_ok:
                    self._last_ok = started_at
                self.last_error = None
        finally:
            self._idle.set()


def read_bounded(path: Path, timeout_s: float, limit: int) -> bytes | None:
    """Read a small file from the shared storage without risking the caller on a hung mount.

    None if it does not exist; OSError if it cannot be read in time (or at all)."""
    result: dict[str, bytes | BaseException | None] = {}

    def run() -> None:
        try:
            with open(path, "rb") as f:
                result["data"] = f.read(limit + 1)
        except FileNotFoundError:
            result["data"] = None
        except OSError as exc:
            result["data"] = exc

    thread = threading.Thread(target=run, name="oneha-agent-read", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "data" not in result:
        raise OSError(f"reading {path} took longer than {timeout_s:g} s (storage hung?)")
    data = result["data"]
    if isinstance(data, BaseException):
        raise data
    return data
