"""Workers' coordination primitives against a real Redis (and the oned gateway against the lab)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from oneha.keys import Keys
from oneha.opennebula import ErrorKind, OnedClient, make_server
from oneha.settings import OnedSettings
from oneha.waiting import wait_until
from oneha.workers.lock import Lease, LeaseLost
from oneha.workers.oned import OnedError, OnedGateway, OnedSemaphore
from tests.labkit import call, running_lab


def test_lease_token_check_and_takeover(redis_client: redis.Redis) -> None:
    keys = Keys()
    a = Lease(redis_client, keys, "host", 1, ttl_s=0.3)
    b = Lease(redis_client, keys, "host", 1, ttl_s=5)
    assert a.acquire()
    assert not b.acquire()  # held
    a.check()
    wait_until(lambda: redis_client.get(keys.lock("host", 1)) is None, 3, what="lease expiry")  # a paused
    assert b.acquire()
    assert int(b.token or 0) > int(a.token or 0)  # fencing tokens grow
    with pytest.raises(LeaseLost):
        a.check()  # the paused holder stops instead of acting
    b.check()
    a.release()  # must not release b's lock
    b.check()
    b.release()
    assert redis_client.get(keys.lock("host", 1)) is None


def test_lease_renewal_keeps_it_alive(redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, Keys(), "vm", 9, ttl_s=0.3)
    assert lease.acquire()
    with lease:
        deadline = time.monotonic() + 1.0
        wait_until(lambda: time.monotonic() > deadline, 2, what="three lease periods")
        lease.check()
    assert redis_client.get(Keys().lock("vm", 9)) is None


def test_semaphore_caps_and_reaps_dead_holders(redis_client: redis.Redis) -> None:
    sem = OnedSemaphore(redis_client, Keys().oned_semaphore, cap=2, ttl_s=0.3)
    assert sem.try_acquire("a") and sem.try_acquire("b")
    assert not sem.try_acquire("c")
    # "a" and "b" die without releasing: their slots expire
    holder = sem.acquire(timeout_s=3)  # possible only once a dead holder's slot was reaped
    # "b" was taken a moment after "a" and may expire a moment later: the next acquire reaps it too
    wait_until(lambda: sem.try_acquire("c"), 3, what="the second dead slot reaped")
    assert set(redis_client.zrange(Keys().oned_semaphore, 0, -1)) == {holder, "c"}
    sem.release(holder)
    redis_client.zrem(Keys().oned_semaphore, "c")  # taken with try_acquire: no local slot to give back
    assert sem.holders() == 0


def peak_holders(sem: OnedSemaphore, threads: int, rounds: int = 5) -> int:
    """Most slots held at once while `threads` threads each take and release one `rounds` times."""
    inside, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        for _ in range(rounds):
            holder = sem.acquire(10)
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.01)  # the work done while holding the slot
            with lock:
                inside[0] -= 1
            sem.release(holder)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return peak[0]


def test_semaphore_bounds_concurrency_across_threads(redis_client: redis.Redis) -> None:
    sem = OnedSemaphore(redis_client, Keys().oned_semaphore, cap=3, ttl_s=10)
    assert peak_holders(sem, threads=10) == 3


def test_semaphore_kept_slots_count_toward_the_cap_and_are_handed_back(redis_client: redis.Redis) -> None:
    sem = OnedSemaphore(redis_client, Keys().oned_semaphore, cap=3, ttl_s=10, reuse_s=1.0, idle_s=0.05)
    other = OnedSemaphore(redis_client, Keys().oned_semaphore, cap=3, ttl_s=10)  # another process
    first = sem.acquire(1)
    sem.release(first)
    assert sem.acquire(1) == first  # reused: no round trip
    assert sem.holders() == 1
    held = [other.try_acquire("x"), other.try_acquire("y"), other.try_acquire("z")]
    assert held == [True, True, False]  # the kept slot still counts
    sem.release(first)
    wait_until(lambda: sem.holders() == 2, 2, what="the idle slot handed back")
    assert other.try_acquire("z")
    redis_client.delete(Keys().oned_semaphore)
    assert peak_holders(sem, threads=8) == 3
    wait_until(lambda: sem.holders() == 0, 2, what="all kept slots handed back")


def gateway(url: str, redis_client: redis.Redis, **oned: object) -> OnedGateway:
    settings = OnedSettings(endpoint=url, **oned)  # type: ignore[arg-type]
    server = make_server(url, "oneadmin:opennebula", settings.connect_timeout_s, settings.read_timeout_s)
    sem = OnedSemaphore(redis_client, Keys().oned_semaphore, settings.max_concurrent_calls, 20)
    return OnedGateway(OnedClient(server), sem, settings, "oneadmin:opennebula")


def test_gateway_retries_transient_errors_and_batches_reads(redis_client: redis.Redis) -> None:
    with running_lab(hosts=2, vms=40) as lab:
        gw = gateway(lab.rpc_url, redis_client, call_attempts=8, backoff_base_s=0.01, backoff_max_s=0.05)
        call(lab.rpc_url, "lab.faults", {"error_rate": 0.3, "latency_ms": 10})
        results: dict[int, object] = {}

        def read(i: int) -> None:
            results[i] = gw.reader.get(i)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(results[i] is not None for i in range(40))
        assert gw.calls["one.vmpool.infoset"] < 40  # coalesced
        with pytest.raises(OnedError) as err:
            gw.vm_info(999)
        assert err.value.kind is ErrorKind.PERMANENT and "opennebula" not in str(err.value)


def test_gateway_times_out_when_oned_hangs(redis_client: redis.Redis) -> None:
    with running_lab(hosts=1, vms=1) as lab:
        gw = gateway(lab.rpc_url, redis_client, read_timeout_s=0.3, call_attempts=2, backoff_base_s=0.01)
        call(lab.rpc_url, "lab.faults", {"hang": True})
        started = time.monotonic()
        with pytest.raises(OnedError) as err:
            gw.host_info(0)
        assert err.value.kind is ErrorKind.TRANSIENT and err.value.attempts == 2
        assert time.monotonic() - started < 3
        call(lab.rpc_url, "lab.faults", {"hang": False})


def test_host_rerun_sends_again_only_the_vm_tasks_that_were_lost(redis_url: str, tmp_path: Path) -> None:
    """redispatch_pending on a real Redis: queued tasks are left alone while the VM queue moves; a task that started
    and lost its worker (no VM lease) is sent again; when the queue has not moved for a lease, every one is."""
    from oneha.incidents import Kind, Status
    from oneha.settings import load_settings
    from oneha.workers.host_flow import redispatch_pending
    from oneha.workers.runtime import Flow, Runtime
    from tests.workerkit import write_config

    sent: list[list[Any]] = []
    settings = load_settings(write_config(tmp_path, redis_url, "http://127.0.0.1:9/RPC2"))  # oned never called
    rt = Runtime.build(settings, send=lambda name, args, queue: sent.append(args))
    inc_id = rt.store.report(Kind.HOST, 1, 0, 0.0, "test").incident_id
    rt.store.set_status(inc_id, Status.RECOVERING, order="[10, 11, 12, 13]")
    rt.redis.sadd(rt.keys.incident_pending_vms(inc_id), 10, 11, 12, 13)
    rt.redis.sadd(rt.keys.incident_started_vms(inc_id), 11, 12)  # 10 and 13 still queued
    running = rt.lease("vm", 12)
    assert running.acquire()  # 12's task is running; 11's worker died

    def rerun() -> list[int]:
        sent.clear()
        inc = rt.store.get(inc_id)
        assert inc is not None
        redispatch_pending(Flow(rt, inc))
        return [vm for _, vm in sent]

    rt.mark_vm_queue_moving()
    assert rerun() == [10, 11, 12, 13]  # the first run may have died while sending: 10 and 13 may be lost
    rt.store.set_fields(inc_id, vm_tasks_sent=1)
    assert rerun() == [11]
    rt.redis.set(rt.keys.vm_queue_moving, time.time() - settings.worker.task_lease_s - 1)
    assert rerun() == [10, 11, 12, 13]  # the queue stands still: the broker may have lost them
    running.release()


def test_a_host_incident_whose_vm_records_were_lost_runs_those_vms_again_and_never_undercounts(
        redis_url: str, tmp_path: Path) -> None:
    """Redis lost the VM records and the pending set of a RECOVERING host incident (a restart from an old
    snapshot): the re-run sends the VMs without a record again instead of closing "1 VMs recovered"; a VM still
    without a record at the close counts as not recovered."""
    from oneha.incidents import Kind, Status
    from oneha.settings import load_settings
    from oneha.workers.host_flow import finish_incident, redispatch_pending
    from oneha.workers.runtime import Flow, Runtime
    from tests.workerkit import write_config

    sent: list[list[Any]] = []
    settings = load_settings(write_config(tmp_path, redis_url, "http://127.0.0.1:9/RPC2"))  # oned never called
    rt = Runtime.build(settings, send=lambda name, args, queue: sent.append(args))
    inc_id = rt.store.report(Kind.HOST, 1, 0, 0.0, "test").incident_id
    rt.store.set_status(inc_id, Status.RECOVERING, order="[10, 11, 12]", vms_total=3, vm_tasks_sent=1)
    rt.store.record_vm(inc_id, 10, {"action": "recreate", "result": "recovered"})  # 11 and 12: records lost
    inc = rt.store.get(inc_id)
    assert inc is not None
    redispatch_pending(Flow(rt, inc))
    assert sorted(vm for _, vm in sent) == [11, 12]
    assert rt.store.get(inc_id).status is Status.RECOVERING  # type: ignore[union-attr]
    assert {int(v) for v in rt.redis.smembers(rt.keys.incident_pending_vms(inc_id))} == {11, 12}
    rt.store.record_vm(inc_id, 11, {"action": "none", "result": "recovered", "detail": "already left the host"})
    assert finish_incident(rt, inc_id) is Status.PARTIAL  # 12 still has no record: not counted as recovered
    closed = rt.store.get(inc_id)
    assert closed is not None and closed.detail.startswith("2/3 VMs recovered") and "12:no_record" in closed.detail
