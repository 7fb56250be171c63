"""Subscriber throughput and event-to-incident latency over a real ZeroMQ PUB socket, with baselines in the same run.

A separate publisher process sends VM UNKNOWN events (2,000 VMs, so most reports collapse into open incidents, as in
a failure storm) at a target rate. The send time travels in the VM's NAME, so latency is publish -> report()
returned (the incident is durably in Redis): that includes the time an event waits in the socket while the receiving
thread is busy. "recv p99" is the subscriber's own metric (oneha_enqueue_latency_seconds): the event taken off the
socket -> its incident stored. Compared with: the raw ZeroMQ receive rate, and a naive handler (decode + one plain
Redis SET per event). As in production: JSON logs at INFO (to a file here, stderr there), and the garbage collector
frozen after start-up (subscriber.service.freeze_gc) before every row.
Run: .venv/bin/python -m bench.bench_subscriber [--reconcile]
"""

from __future__ import annotations

import argparse
import base64
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import zmq

from oneha.incidents import IncidentStore
from oneha.opennebula import Event, VmEvent
from oneha.redis_server import RedisServer
from oneha.settings import Policy
from oneha.subscriber import logs
from oneha.subscriber.intake import Intake
from oneha.subscriber.service import freeze_gc
from oneha.subscriber.zmq_listener import ZmqListener, decode_frames

VMS = 2000


def frames(i: int, sent_at: float) -> list[bytes]:
    vid = i % VMS
    doc = (f"<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>VM</HOOK_OBJECT><STATE>ACTIVE</STATE>"
           f"<LCM_STATE>UNKNOWN</LCM_STATE><RESOURCE_ID>{vid}</RESOURCE_ID><REMOTE_HOST>host0001</REMOTE_HOST>"
           f"<VM><ID>{vid}</ID><NAME>{sent_at:.6f}</NAME><STATE>3</STATE><LCM_STATE>16</LCM_STATE>"
           "<USER_TEMPLATE><HA_PRIORITY>1</HA_PRIORITY></USER_TEMPLATE><HISTORY_RECORDS><HISTORY><SEQ>0</SEQ>"
           "<HOSTNAME>host0001</HOSTNAME><HID>1</HID><CID>0</CID><DS_ID>0</DS_ID></HISTORY></HISTORY_RECORDS>"
           "</VM></HOOK_MESSAGE>")
    return [f"EVENT STATE VM/ACTIVE/UNKNOWN/{vid} ".encode(), base64.b64encode(doc.encode())]


def publish(url: str, count: int, rate: float, ready: Any, go: Any, bind: bool = False) -> None:
    sock = zmq.Context().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    if bind:
        sock.bind(url)
    else:
        sock.connect(url)
    ready.set()
    go.wait()
    start = time.perf_counter()
    for i in range(count):
        if rate > 0:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sock.send_multipart(frames(i, time.time()))
    sock.close(linger=5000)


def run(name: str, handler: Callable[[list[bytes]], float | None], count: int, rate: float) -> dict[str, Any]:
    """One receiver thread (like the listener) on a bound SUB socket; the publisher process connects."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"EVENT STATE VM/ACTIVE/UNKNOWN/")
    sock.setsockopt(zmq.RCVHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    spawn = mp.get_context("spawn")
    ready, go = spawn.Event(), spawn.Event()
    proc = spawn.Process(target=publish, args=(f"tcp://127.0.0.1:{port}", count, rate, ready, go))
    proc.start()
    ready.wait(20)
    time.sleep(0.3)  # bench only: let the subscription reach the publisher before the clock starts
    freeze_gc()
    go.set()
    latencies: list[float] = []
    service: list[float] = []
    handled = 0
    first = last = 0.0
    deadline = time.monotonic() + 30
    while handled < count and time.monotonic() < deadline:
        if not sock.poll(500):
            continue
        msg = sock.recv_multipart()
        received = time.time()
        sent = handler(msg)
        stored = time.time()
        now = time.perf_counter()
        first = first or now
        last = now
        handled += 1
        if sent is not None:
            latencies.append(stored - sent)
            service.append(stored - received)
    proc.join(10)
    sock.close(linger=0)
    span = max(last - first, 1e-9)
    return {"name": name, "handled": handled, "rate": handled / span, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "recv_p99": pct(service, 0.99), "lost": count - handled}


def pct(values: list[float], p: float) -> float:
    """Percentile in ms (nan when nothing was measured)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def oneha_handler(url: str) -> Callable[[list[bytes]], float | None]:
    store = IncidentStore(redis.Redis.from_url(url, decode_responses=True))
    intake = Intake(store, Policy())

    def handle(msg: list[bytes]) -> float | None:
        event = decode_frames(msg, 1 << 20)
        if event is None:
            return None
        intake.handle(event, "zmq")
        return sent_at(event)
    return handle


def naive_handler(url: str) -> Callable[[list[bytes]], float | None]:
    r = redis.Redis.from_url(url)

    def handle(msg: list[bytes]) -> float | None:
        event = decode_frames(msg, 1 << 20)
        if event is None:
            return None
        r.set(f"naive:{msg[0].decode()}", msg[1][:16])
        return sent_at(event)
    return handle


def raw_handler(msg: list[bytes]) -> float | None:
    return None


def sent_at(event: Event) -> float | None:
    if isinstance(event, VmEvent) and event.vm is not None:
        return float(event.vm.name)
    return None


def run_listener(url: str, count: int, rate: float) -> dict[str, Any]:
    """The real ZmqListener thread feeding Intake.handle_many, as the service wires it (minus the buffer)."""
    store = IncidentStore(redis.Redis.from_url(url, decode_responses=True))
    intake = Intake(store, Policy())
    latencies: list[float] = []
    service: list[float] = []
    marks: list[float] = []
    sizes: list[int] = []

    def sink(batch: list[tuple[Event, str, float]]) -> None:
        intake.handle_many(batch)
        now = time.time()
        marks.append(time.perf_counter())
        sizes.append(len(batch))
        for event, _, received_at in batch:
            sent = sent_at(event)
            if sent is not None:
                latencies.append(now - sent)
                service.append(now - received_at)

    stop = threading.Event()
    sub_port = _free_port()
    spawn = mp.get_context("spawn")
    ready, go = spawn.Event(), spawn.Event()
    proc = spawn.Process(target=publish_bound, args=(sub_port, count, rate, ready, go))
    proc.start()
    ready.wait(20)
    listener = ZmqListener([f"tcp://127.0.0.1:{sub_port}"], sink, stop, rcvhwm=0)
    thread = threading.Thread(target=listener.run)
    thread.start()
    listener.connected.wait(10)
    time.sleep(0.3)  # bench only: let the subscription reach the publisher before the clock starts
    freeze_gc()
    go.set()
    deadline = time.monotonic() + 30
    while len(latencies) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join()
    proc.join(10)
    span = max(marks[-1] - marks[0], 1e-9) if len(marks) > 1 else 1e-9
    return {"name": f"oneha listener+intake @ {rate:.0f}/s" if rate else "oneha listener+intake @ max",
            "handled": len(latencies), "rate": len(latencies) / span, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "recv_p99": pct(service, 0.99), "lost": count - len(latencies),
            "batches": f"{len(sizes)} batches, mean {len(latencies) / max(len(sizes), 1):.1f}, "
                       f"max {max(sizes, default=0)}"}


def publish_bound(port: int, count: int, rate: float, ready: Any, go: Any) -> None:
    """`publish` from a PUB socket that binds, as one_hm does, for the service's SUB socket to connect to."""
    publish(f"tcp://127.0.0.1:{port}", count, rate, ready, go, bind=True)


def _free_port() -> int:
    from oneha.redis_server import free_port

    return free_port()


def reconcile_cost(hosts: int, vms: int, failed_hosts: int) -> None:
    from oneha.lab.sim import LabCloud
    from oneha.opennebula import OnedClient, make_server
    from oneha.subscriber.reconciler import PassStats, Reconciler

    t0 = time.perf_counter()
    lab = LabCloud(hosts=hosts, vms=vms, monitoring_interval_s=0.2, step_delay_s=0.01).start(port=0, events_port=0)
    print(f"  lab with {hosts} hosts / {vms} VMs built in {time.perf_counter() - t0:.1f}s")
    server = RedisServer.start()
    try:
        from oneha.lab.cli import lab_call

        for hid in range(failed_hosts):
            lab_call(lab.rpc_url, "lab.host.kill", hid, session=lab.session)
        client = OnedClient(make_server(lab.rpc_url, lab.session, 3.0, 60.0))
        deadline = time.monotonic() + 10
        while sum(h.failed for h in client.host_pool()) < failed_hosts and time.monotonic() < deadline:
            time.sleep(0.1)
        store = IncidentStore(redis.Redis.from_url(server.url, decode_responses=True))
        rec = Reconciler(lambda: client, Intake(store, Policy()), store, 30, 300, threading.Event())
        for label, fn in (("fast pass (host pool + VMs of failed hosts)", rec.fast_pass),
                          ("fast pass again (all duplicates)", rec.fast_pass),
                          ("full pass (all ACTIVE VMs, paged)", rec.full_pass)):
            stats = PassStats(label)
            start = time.perf_counter()
            fn(stats)
            took = time.perf_counter() - start
            print(f"  {label:45s} {took * 1000:8.0f} ms  oned calls={stats.oned_calls} hosts={stats.hosts} "
                  f"vms={stats.vms} outcomes={dict(stats.outcomes)}")
    finally:
        server.stop()
        lab.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--reconcile", action="store_true", help="also the reconcile cost at 1,000 hosts/20,000 VMs")
    args = parser.parse_args()
    count = int(args.rate * args.seconds)
    fd, log_path = tempfile.mkstemp(prefix="bench_subscriber-", suffix=".jsonl")
    os.close(fd)
    logs.configure(logging.INFO)  # production logging, written to a file instead of stderr
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger("oneha").handlers[:] = [handler]
    server = RedisServer.start()
    try:
        print(f"bench_subscriber: {count} VM UNKNOWN events over {VMS} VMs, one receiving thread, Redis on loopback")
        rows = []
        for rate in (args.rate, 0.0):
            redis.Redis.from_url(server.url).flushall()
            label = f"{rate:.0f}/s" if rate else "max"
            rows.append(run(f"raw zmq receive @ {label}", raw_handler, count, rate))
            rows.append(run(f"naive decode+SET @ {label}", naive_handler(server.url), count, rate))
            redis.Redis.from_url(server.url).flushall()
            rows.append(run(f"oneha intake, unbatched @ {label}", oneha_handler(server.url), count, rate))
            redis.Redis.from_url(server.url).flushall()
            rows.append(run_listener(server.url, count, rate))
        print(f"  {'':32s} {'events/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'recv p99':>9s} {'lost':>6s}")
        for row in rows:
            print(f"  {row['name']:32s} {row['rate']:9.0f} {row['p50']:8.2f} {row['p99']:8.2f} {row['recv_p99']:9.2f}"
                  f" {row['lost']:6d}" + (f"   ({row['batches']})" if "batches" in row else ""))
        handler.close()
        with open(log_path) as f:
            lines = sum(1 for _ in f)
        print(f"  (latency: publish -> incident stored; recv p99: socket -> stored; {lines} JSON log lines written)")
    finally:
        server.stop()
        os.unlink(log_path)
    if args.reconcile:
        print("reconcile cost:")
        reconcile_cost(1000, 20000, 5)


if __name__ == "__main__":
    main()
