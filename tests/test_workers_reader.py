"""VmReader: coalesced VM reads, with a second call started while one is in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from oneha.waiting import wait_until
from workers.oned import VmReader


def test_reader_starts_a_second_call_while_one_is_in_flight_and_coalesces_beyond() -> None:
    release = threading.Event()
    started: list[frozenset[int]] = []
    lock = threading.Lock()

    def fetch(ids: Iterable[int]) -> list[Any]:
        wanted = frozenset(ids)
        with lock:
            started.append(wanted)
            first = len(started) <= 2
        if first:
            assert release.wait(5)
        return [SimpleNamespace(id=i) for i in wanted if i != 99]

    reader = VmReader(fetch, fetchers=2)  # type: ignore[arg-type]
    out: dict[int, object] = {}

    def get(i: int) -> None:
        out[i] = reader.get(i, timeout_s=5)

    threads = [threading.Thread(target=get, args=(i,)) for i in (1, 2)]
    threads[0].start()
    wait_until(lambda: len(started) >= 1, 5, interval_s=0.001, what="the first call")
    threads[1].start()
    # the second request does not wait for the first call to end
    wait_until(lambda: len(started) >= 2, 5, interval_s=0.001, what="a second call in flight")
    later = [threading.Thread(target=get, args=(i,)) for i in (3, 4, 99)]
    for t in later:
        t.start()
    threading.Event().wait(0.05)
    assert len(started) == 2  # both fetchers busy: the others wait, to share one call
    release.set()
    for t in threads + later:
        t.join(5)
    assert [getattr(out[i], "id", None) for i in (1, 2, 3, 4)] == [1, 2, 3, 4] and out[99] is None
    assert len(started) == 3 and started[2] == frozenset({3, 4, 99})
    assert reader.batches == 3
