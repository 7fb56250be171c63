"""Detector instances share their views through Redis; a host is suspect when a quorum of alive instances each
missed it `misses_to_suspect` rounds in a row.

Each instance replaces its view hash every round (host id -> consecutive misses, only votes) with a short TTL: the
view's existence is the instance's "I am alive", so a dead or partitioned instance's votes expire with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import redis

from oneha.keys import Keys

ALIVE_FIELD = "_alive"


class Quorum:
    def __init__(self, client: redis.Redis, keys: Keys, instance: str, ttl_s: float) -> None:
        self.r, self.keys, self.instance = client, keys, instance
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def publish(self, votes: Mapping[int, int]) -> None:
        """Replace this instance's view (an empty one withdraws every vote but keeps the instance alive)."""
        key = self.keys.detect_view(self.instance)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={ALIVE_FIELD: "1", **{str(h): str(c) for h, c in votes.items()}})
        pipe.pexpire(key, self.ttl_ms)
        pipe.sadd(self.keys.detect_instances, self.instance)
        pipe.execute()

    def withdraw(self) -> None:
        self.r.delete(self.keys.detect_view(self.instance))

    def suspects(self, threshold: int, quorum: int) -> tuple[set[int], int]:
        """(hosts voted by at least `quorum` alive instances, alive instances). Instances whose view expired are
        pruned from the set."""
        instances = sorted(str(i) for i in self.r.smembers(self.keys.detect_instances))
        if not instances:
            return set(), 0
        pipe = self.r.pipeline(transaction=False)
        for name in instances:
            pipe.hgetall(self.keys.detect_view(name))
        views = pipe.execute()
        gone = [name for name, view in zip(instances, views, strict=True) if not view]
        if gone:
            self.r.srem(self.keys.detect_instances, *gone)
        votes: Counter[int] = Counter()
        for view in views:
            for field, value in view.items():
                if field != ALIVE_FIELD and int(value) >= threshold:
                    votes[int(field)] += 1
        return {h for h, n in votes.items() if n >= quorum}, len(instances) - len(gone)
