"""Detector probe bench: one probe round of 1,000 hosts, as `oneha detect` runs it (one asyncio loop), beside the
obvious alternative in the same run (a thread per host, blocking sockets). The hosts' side runs in a child process,
so the CPU time is the prober's alone.

    .venv/bin/python -m bench.bench_detect [--rounds 5] [--timeout 0.3]

The hosts are loopback addresses 127.70.x.y (root: port 22): 600 answer like sshd (banner, close), 100 accept TCP
and never send anything (a hung kernel: the handshake completes in the backlog), 300 refuse. Printed: wall time
and CPU time per round, for each, and whether every host was classed right.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from oneha.detect.probe import probe_round

ANSWERING, HUNG, REFUSED = range(0, 600), range(600, 700), range(700, 1000)
BANNER = b"SSH-2.0-bench\r\n"


def addr(i: int) -> str:
    return f"127.70.{i // 250}.{i % 250 + 1}"


def can_bind_22() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.70.9.9", 22))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def fleet() -> Iterator[None]:
    """600 sshd-like listeners on their own loop and thread, 100 that never accept, 300 addresses with nothing."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await writer.drain()
        writer.close()

    async def start() -> list[asyncio.Server]:
        return [await asyncio.start_server(answer, addr(i), 22) for i in ANSWERING]

    servers = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    hung = []
    for i in HUNG:
        s = socket.socket()
        s.bind((addr(i), 22))
        s.listen(16)
        hung.append(s)
    try:
        yield
    finally:
        for s in hung:
            s.close()
        for server in servers:
            loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _serve(ready: Any, stop: Any) -> None:
    with fleet():
        ready.set()
        stop.wait()


@contextlib.contextmanager
def fleet_process() -> Iterator[None]:
    """The fleet in a child process: the CPU time measured here is the prober's alone."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_serve, args=(ready, stop), daemon=True)
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the host fleet did not start")
        yield
    finally:
        stop.set()
        child.join(10)


def blocking_probe(address: str, timeout_s: float) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout_s) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def threads_round(addresses: dict[int, str], timeout_s: float, pool: ThreadPoolExecutor) -> dict[int, bool]:
    ids = list(addresses)
    return dict(zip(ids, pool.map(lambda h: blocking_probe(addresses[h], timeout_s), ids), strict=True))


def timed(fn: object) -> tuple[float, float, dict[int, bool]]:
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fn()  # type: ignore[operator]
    wall, cpu1 = time.perf_counter() - wall0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=0.3)
    args = parser.parse_args()
    if not can_bind_22():
        raise SystemExit("needs to bind port 22 on 127.70.x.y (root)")
    targets = {i: addr(i) for i in range(1000)}
    right = set(ANSWERING)
    with fleet_process(), ThreadPoolExecutor(max_workers=1000) as pool:
        contenders = {
            "oneha detect (one asyncio loop)": lambda: asyncio.run(probe_round(targets, [22], args.timeout)),
            "baseline: a thread per host": lambda: threads_round(targets, args.timeout, pool),
        }
        print(f"1,000 hosts (600 answer, 100 hung, 300 refused), probe timeout {args.timeout * 1000:.0f} ms")
        for name, fn in contenders.items():
            fn()  # warm-up
            runs = [timed(fn) for _ in range(args.rounds)]
            ok = all({h for h, up in r.items() if up} == right for _, _, r in runs)
            walls, cpus = [w * 1000 for w, _, _ in runs], [c * 1000 for _, c, _ in runs]
            print(f"  {name:<34} wall {min(walls):.0f}-{max(walls):.0f} ms, CPU {min(cpus):.0f}-{max(cpus):.0f} "
                  f"ms per round, classed right: {ok}")


if __name__ == "__main__":
    main()
