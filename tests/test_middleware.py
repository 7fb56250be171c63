"""The task middleware chain (workers/middleware.py): order and what each one makes of a failure. Pure logic."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis

from oneha.workers import middleware
from oneha.workers.lock import LeaseLost
from oneha.workers.middleware import Middleware, RideOutRedis, StopQuietly
from oneha.workers.runtime import Paused


def _task() -> Any:
    return SimpleNamespace(name="t", request=SimpleNamespace(args=[1], retries=0))


class Trace(Middleware):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def around_task(self, task: Any, call: middleware.Call) -> str:
        self.seen.append(self.name)
        return call()


def test_the_first_middleware_is_outermost():
    seen: list[str] = []
    result = middleware.run([Trace("a", seen), Trace("b", seen)], _task(), lambda: seen.append("flow") or "ok")
    assert (result, seen) == ("ok", ["a", "b", "flow"])


def test_a_redis_outage_runs_the_rest_of_the_chain_again():
    seen: list[str] = []

    def flow() -> str:
        if seen.count("inner") < 3:
            raise redis.ConnectionError("down")
        return "done"

    chain = [RideOutRedis(outage_s=10.0), Trace("inner", seen)]
    assert middleware.run(chain, _task(), flow) == "done"
    assert seen == ["inner"] * 3


def test_a_redis_outage_past_its_limit_is_raised():
    def flow() -> str:
        raise redis.TimeoutError("down")

    with pytest.raises(redis.TimeoutError):
        middleware.run([RideOutRedis(outage_s=0.0)], _task(), flow)


@pytest.mark.parametrize(("exc", "result"), [(LeaseLost("gone"), "lease_lost"), (Paused("paused"), "paused")])
def test_lost_lease_and_pause_end_the_task_quietly(exc: Exception, result: str):
    def flow() -> str:
        raise exc

    assert middleware.run([StopQuietly()], _task(), flow) == result


def test_the_vm_queue_tasks_declare_it():
    from oneha.workers import tasks

    assert tasks.recover_vm.moves_vm_queue and tasks.vm_incident.moves_vm_queue
    assert not getattr(tasks.recover_host, "moves_vm_queue", False)


def test_the_chain_takes_its_limits_from_the_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from oneha.workers import tasks

    monkeypatch.setenv("ONEHA_WORKER__TASK_MAX_RETRIES", "2")
    monkeypatch.setenv("ONEHA_WORKER__REDIS_OUTAGE_S", "7.5")
    tasks.middleware_chain.cache_clear()
    try:
        chain = tasks.middleware_chain()
        assert [type(m).__name__ for m in chain] == ["RetryTransient", "StopQuietly", "RideOutRedis",
                                                    "MarkVmQueueMoving"]
        assert chain[0].max_retries == 2 and chain[2].outage_s == 7.5  # type: ignore[attr-defined]
    finally:
        tasks.middleware_chain.cache_clear()
