"""Helpers to run the lab cloud in tests and benchmarks: in-process, as a subprocess, and lab.* calls."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from oneha.lab.cli import LabCallError, lab_call
from oneha.lab.sim import DEFAULT_SESSION, LabCloud

__all__ = ["LabCallError", "LabProcess", "call", "lab_process", "running_lab", "subscriber", "sync_subscriber"]

# Fast settings for tests: transitions in 30 ms, a host ERROR 0.3 s after it stops answering.
FAST = {"monitoring_interval_s": 0.3, "step_delay_s": 0.03}


@contextlib.contextmanager
def running_lab(**kwargs: Any) -> Iterator[LabCloud]:
    """An in-process lab on free ports."""
    options = {**FAST, **kwargs}
    lab = LabCloud(**options).start(port=0, events_port=0)
    try:
        yield lab
    finally:
        lab.stop()


def call(url: str, method: str, *args: Any, session: str = DEFAULT_SESSION) -> Any:
    """A lab.* / one.* call with the reply unwrapped (LabCallError on `[False, …]`)."""
    return lab_call(url, method, *args, session=session)


@dataclass
class LabProcess:
    process: subprocess.Popen[str]
    rpc_url: str
    events_url: str
    session: str


_READY = re.compile(r"^LAB READY rpc=(\S+) events=(\S+) session=(\S+)$")


@contextlib.contextmanager
def lab_process(*args: str, timeout_s: float = 20.0) -> Iterator[LabProcess]:
    """`oneha lab sim --port 0 --events-port 0 …` as a subprocess; stopped with SIGTERM."""
    cmd = [sys.executable, "-c", "from oneha.cli import main; main()", "lab", "sim", "--port", "0",
           "--events-port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()  # blocks until the lab prints; the deadline guards a silent exit
            if not line:
                raise RuntimeError(f"lab exited early: {proc.stderr.read() if proc.stderr else ''}")
            if m := _READY.match(line.strip()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("lab did not report its ports")
        yield LabProcess(proc, m[1], m[2], m[3])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sync_subscriber(sock: zmq.Socket[bytes], rpc_url: str, timeout_s: float = 10.0) -> None:
    """Wait until the SUB socket really receives (PUB/SUB drops what is sent before the subscription lands).

    Creates HOLD VMs named "sync" (each publishes a HOLD event) until one arrives, then drains the socket.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        call(rpc_url, "lab.vm.create", {"STATE": "HOLD", "NAME": "sync"})
        if sock.poll(100):
            while sock.poll(50):
                sock.recv_multipart()
            return
    raise TimeoutError("the SUB socket never received an event")


@contextlib.contextmanager
def subscriber(url: str, *prefixes: bytes) -> Iterator[zmq.Socket[bytes]]:
    """A SUB socket connected to the lab's events (all events when no prefix is given)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for prefix in prefixes or (b"",):
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(url)
    try:
        yield sock
    finally:
        sock.close()
