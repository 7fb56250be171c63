"""oneha/detect/probe.py: one event loop probes 1,000 hosts in one round and tells an answering sshd from a refused
port and from a hung kernel (TCP accepted, no banner); the pure pieces of the decision."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from bench.bench_detect import ANSWERING, addr, can_bind_22, fleet
from oneha.detect.misses import Misses, is_storm
from oneha.detect.probe import probe_round
from oneha.detect.proof import Evidence, Rule, verdict


@pytest.fixture(scope="module")
def listeners() -> Iterator[None]:
    if not can_bind_22():
        pytest.skip("needs to bind port 22 on 127.70.x.y (root)")
    with fleet():
        yield


def test_one_round_of_1000_hosts_tells_sshd_from_hung_and_refused(listeners: None) -> None:
    """Correctness only, with a timeout generous enough for a loaded machine; the round's speed is measured in
    bench/bench_detect.py, beside a thread-per-host baseline."""
    results = asyncio.run(probe_round({i: addr(i) for i in range(1000)}, [22], timeout_s=3.0))
    assert [i for i, ok in results.items() if ok] == list(ANSWERING)  # hung and refused both miss


def test_misses_and_the_storm_guard() -> None:
    m = Misses()
    for answered in (False, False, True, False, False, False):
        m.update({1: answered, 2: True}, time.monotonic())
    assert m.votes(3) == {1: 3} and m.missing() == 1
    assert not is_storm(1, 10, 0.3, 2) and not is_storm(3, 10, 0.3, 2) and is_storm(4, 10, 0.3, 2)
    assert not is_storm(1, 2, 0.3, 2)  # one host of two is not a storm: it needs at least storm_min_hosts


def test_the_heartbeat_proves_only_what_it_can() -> None:
    rule = Rule(stale_s=25, margin_s=4, fresh_s=5)
    ok = Evidence(now=100.0, changed_at=70.0, deadline_s=21, last_answer=71.0, dir_healthy=True)
    assert verdict(ok, rule)[0] == "dead"
    cases = {
        "beating": Evidence(100.0, 97.0, 21, 71.0, True),
        "never seen changing (no agent, or a file from long ago)": Evidence(100.0, None, 21, 71.0, True),
        "stopped before the host stopped answering": Evidence(100.0, 40.0, 21, 71.0, True),
        "deadline does not fit": Evidence(100.0, 70.0, 22, 71.0, True),
        "not stale long enough": Evidence(100.0, 80.0, 21, 81.0, True),
        "own view of the storage unhealthy": Evidence(100.0, 70.0, 21, 71.0, False),
        "never saw the host answer": Evidence(100.0, 70.0, 21, None, True),
    }
    found = {name: verdict(ev, rule)[0] for name, ev in cases.items()}
    assert found == {name: "beating" if name == "beating" else "unproven" for name in cases}


def test_sharing_a_1000_host_view_through_redis_is_cheap(redis_url: str) -> None:
    """The rest of a round: publish this instance's votes, read three instances' views, refresh the live view."""
    from oneha import redisconn
    from oneha.detect.quorum import Quorum
    from oneha.detect.states import SUSPECT, HostStates
    from oneha.keys import Keys
    from oneha.settings import RedisSettings

    client = redisconn.client(RedisSettings(url=redis_url))
    quorums = [Quorum(client, Keys(), name, 3.0) for name in ("a", "b", "c")]
    states = HostStates(client, Keys(), "a")
    votes = {h: 5 for h in range(0, 1000, 3)}  # a third of the hosts voted suspect by every instance
    for q in quorums:
        q.publish(votes)
    for h in votes:
        states.set(h, SUSPECT)
    started = time.perf_counter()
    for _ in range(10):
        quorums[0].publish(votes)
        suspects, alive = quorums[0].suspects(3, 2)
        states.refresh()
    took = (time.perf_counter() - started) / 10
    print(f"\nshare a 1000-host view (334 votes, 3 instances) + refresh the live view: {took * 1000:.1f} ms")
    assert suspects == set(votes) and alive == 3
    assert took < 0.1
