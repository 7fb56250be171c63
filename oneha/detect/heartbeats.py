"""The hosts' storage heartbeats as this detector sees them, on its own monotonic clock (contract point 2).

A heartbeat *changes* when its (boot, seq) differs from the one read before; the first read of a file is not a
change (a file left from long ago must never look alive, nor prove anything). Nothing compares two machines' clocks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from oneha.timing_rule import DETECTOR_FILE, MAX_HEARTBEAT_BYTES, Heartbeat, detector_document


@dataclass
class Seen:
    stamp: tuple[str, int]  # (boot, seq) last read
    deadline_s: float | None  # None: the heartbeat promises no self-fence (unarmed, no watchdog, stopped)
    changed_at: float | None = None  # monotonic time this detector last saw it change; None: never seen change


class HeartbeatWatch:
    def __init__(self, directory: Path, instance: str) -> None:
        self.dir = directory
        self.probe_file = directory / f".detector-{instance}.probe"
        self.seen: dict[str, Seen] = {}
        self.readable = False
        self.round_trip_ok = False
        self.polled_at: float | None = None  # monotonic end of the last complete poll (a hung mount stops it)

    def poll(self, names: Iterable[str], now: float, fresh_s: float) -> None:
        """Read every host's heartbeat once (bounded reads; an unreadable or malformed file is simply not a change).
        When no heartbeat at all is fresh, the detector's own probe file tells a quiet cloud from a broken mount.
        Runs in a thread of its own: a hung read stops only this, and `healthy` then says so."""
        self.readable = self.dir.is_dir() and os.access(self.dir, os.R_OK)
        for name in names:
            hb = read(self.dir / name)
            if hb is None:
                continue
            stamp = (hb.boot, hb.seq)
            deadline = hb.deadline_s if hb.proves_self_fence else None
            old = self.seen.get(name)
            if old is None:
                self.seen[name] = Seen(stamp, deadline)
            elif old.stamp != stamp:
                old.stamp, old.deadline_s, old.changed_at = stamp, deadline, now
        fresh = any(s.changed_at is not None and now - s.changed_at <= fresh_s for s in self.seen.values())
        self.round_trip_ok = fresh or self.round_trip()
        self.polled_at = time.monotonic()

    def changed_at(self, name: str) -> float | None:
        seen = self.seen.get(name)
        return seen.changed_at if seen is not None else None

    def deadline_s(self, name: str) -> float | None:
        seen = self.seen.get(name)
        return seen.deadline_s if seen is not None else None

    def has_agent(self, name: str) -> bool:
        """This detector has seen the host's heartbeat change at least once: an agent writes it."""
        return self.changed_at(name) is not None

    def healthy(self, but: str, now: float, fresh_s: float) -> bool:
        """This detector's view of the directory can be trusted: its last poll is recent and could read, and
        another host's heartbeat is fresh or its own probe file round-tripped (a detector whose storage mount hangs
        must neither call a host dead nor take a silent heartbeat for a stopped one). No I/O here."""
        if not self.readable or self.polled_at is None or now - self.polled_at > fresh_s:
            return False
        if any(n != but and s.changed_at is not None and now - s.changed_at <= fresh_s for n, s in self.seen.items()):
            return True
        return self.round_trip_ok

    def round_trip(self) -> bool:
        token = secrets.token_hex(8).encode()
        try:
            atomic_write(self.probe_file, token)
            return self.probe_file.read_bytes() == token
        except OSError:
            return False

    def publish_threshold(self, heartbeat_stale_s: float, margin_s: float) -> bool:
        """`<dir>/detector.json`, for the agents' start-up check (written atomically; every instance the same)."""
        try:
            atomic_write(self.dir / DETECTOR_FILE, detector_document(heartbeat_stale_s, margin_s))
        except OSError:
            return False
        return True


def read(path: Path) -> Heartbeat | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_HEARTBEAT_BYTES + 1)
        return Heartbeat.decode(raw)
    except (OSError, ValueError):
        return None


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
