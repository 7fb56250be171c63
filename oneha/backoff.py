"""The one backoff: exponential delays between attempts, capped, with full jitter where many clients retry at once.

Full jitter (a delay drawn uniformly up to the exponential cap) spreads the retries of many workers hitting the
same oned; a single loop waiting for Redis to come back needs no jitter, only a growing, capped delay.
"""

from __future__ import annotations

import random


def full_jitter(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**attempt)]."""
    return (rng or random).uniform(0, capped(attempt, base_s, max_s))


def capped(attempt: int, base_s: float, max_s: float) -> float:
    """base * 2**attempt, at most `max_s` (attempt 0 waits `base_s`)."""
    return min(max_s, base_s * (2 ** max(0, attempt)))


class Backoff:
    """Delays for one retry loop: `next_s()` gives base, 2 * base, 4 * base ... up to `max_s`; `reset()` on success."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.attempt = 0

    def peek_s(self) -> float:
        """The delay the next `next_s()` will give."""
        return capped(self.attempt, self.base_s, self.max_s)

    def next_s(self) -> float:
        delay_s = self.peek_s()
        self.attempt += 1
        return delay_s

    def reset(self) -> None:
        self.attempt = 0
