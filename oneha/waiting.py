"""The one polling helper: wait for a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    pass


def wait_until(condition: Callable[[], T | None], timeout_s: float, interval_s: float = 0.05,
               what: str = "condition", backoff: float = 1.5, max_interval_s: float = 2.0) -> T:
    """Poll `condition` until it returns something truthy and return it; raise WaitTimeout at the deadline.

    The interval grows by `backoff` up to `max_interval_s`, so a long wait does not hammer oned or Redis.
    """
    deadline = time.monotonic() + timeout_s
    delay = interval_s
    while True:
        result = condition()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(min(delay, remaining))
        delay = min(delay * backoff, max_interval_s)
