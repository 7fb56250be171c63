"""This instance's own view: consecutive missed probe rounds per host, and when each host last answered."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class Misses:
    counts: dict[int, int] = field(default_factory=dict)
    last_answer: dict[int, float] = field(default_factory=dict)  # monotonic time of the host's last answer

    def update(self, results: Mapping[int, bool], now: float) -> None:
        for hid, answered in results.items():
            if answered:
                self.counts[hid] = 0
                self.last_answer[hid] = now
            else:
                self.counts[hid] = self.counts.get(hid, 0) + 1

    def keep_only(self, host_ids: Iterable[int]) -> None:
        """Forget hosts no longer probed (deleted, or set OFFLINE/DISABLED by an operator)."""
        keep = set(host_ids)
        for d in (self.counts, self.last_answer):
            for hid in [h for h in d if h not in keep]:
                del d[hid]

    def missing(self) -> int:
        """Hosts in a miss streak right now (the storm guard's count)."""
        return sum(1 for c in self.counts.values() if c > 0)

    def votes(self, threshold: int) -> dict[int, int]:
        """Hosts this instance votes suspect: missed at least `threshold` rounds in a row."""
        return {hid: c for hid, c in self.counts.items() if c >= threshold}


def is_storm(missing: int, total: int, max_share: float, min_hosts: int) -> bool:
    """This instance misses too much at once: its own network is the likelier fault (oVirt: "skip fencing if
    connectivity is broken"); the workers' storm guard, applied to detection."""
    return missing >= min_hosts and missing > max_share * total
