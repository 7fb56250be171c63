"""The one timing rule between a host's agent and the detectors, written once (issue 13).

A detector may call a host dead on its storage heartbeat alone only if the host is certain to have stopped its VMs
by then. The agent (`oneha agent`, on every hypervisor) guarantees it: it rewrites its heartbeat file on the shared
storage every `beat_interval_s`, and pets the watchdog only while its last successful heartbeat write, and (with
`isolation = "fence"`) its last contact with a detector, are younger than `loss_timeout_s`. So, counted from the
agent's last successful write:

    the agent notices the loss              <= loss_timeout_s + beat_interval_s  (it checks once per beat)
    the watchdog resets the host            <= that + watchdog_timeout_s
    => self_fence_deadline_s = beat_interval_s + loss_timeout_s + watchdog_timeout_s

A detector sees a write only after it happened, so "no new write seen for longer than the deadline" implies "no
write for longer than the deadline". It adds `margin_s` for clock-rate differences and the reset itself, and uses
the deadline the *agent* published in its heartbeat (never its own idea of it): a heartbeat whose deadline plus the
margin exceeds the detector's `heartbeat_stale_s` cannot prove anything, and the detector says so. The agent, at
start, reads the detectors' threshold (published in the heartbeat directory) and refuses to run with a deadline
that does not fit.

Worked example (the defaults): beat 1 s + loss 10 s + watchdog 10 s = 21 s deadline; margin 4 s; a detector with
`heartbeat_stale_s = 25` may call a silent host dead 25 s after the last heartbeat it saw change.

The heartbeat file is small JSON, one per host: {"v": 1, "host": name, "seq": n, "boot": boot id,
"deadline_s": d, "isolation": "fence" | "storage-only", "status": s}. `seq` changes on every write; nothing relies on
the clocks of two machines agreeing.

`status` (added by the agent, issue 13; absent = "armed", as the format was first written) says whether the heartbeat
carries the guarantee at all. Only "armed" does: the agent's watchdog is armed and the agent pets it by the rule
above. "unarmed" (the agent has not yet seen its storage and a detector since it started: it arms only then, so a
host booting into a partition cannot reboot-loop), "no-watchdog" (`watchdog = "none"`) and "stopped" (the agent was
stopped cleanly and disarmed its watchdog) promise nothing, and are written with `"deadline_s": null`, decoded as an
infinite deadline: `fits()` is then false for every threshold, so a reader that forgot to look at `status` still
cannot take such a heartbeat for proof, and a reader of the first format rejects it as malformed. Readers use
`Heartbeat.proves_self_fence`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

FORMAT_VERSION = 1
MAX_HEARTBEAT_BYTES = 4096  # a heartbeat larger than this is not read (the directory is shared: bounded reads)
DETECTOR_FILE = "detector.json"  # the detectors' published threshold, in the heartbeat directory
DEFAULT_MARGIN_S = 4.0

Isolation = Literal["fence", "storage-only"]
Status = Literal["armed", "unarmed", "no-watchdog", "stopped"]
STATUSES: tuple[Status, ...] = ("armed", "unarmed", "no-watchdog", "stopped")


class TimingError(ValueError):
    """Settings that could let a detector declare a host dead before its watchdog has fired."""


@dataclass(frozen=True)
class AgentTiming:
    beat_interval_s: float = 1.0
    loss_timeout_s: float = 10.0
    watchdog_timeout_s: float = 10.0

    @property
    def self_fence_deadline_s(self) -> float:
        """Worst case from the agent's last successful heartbeat write to the host reset by its watchdog."""
        return self.beat_interval_s + self.loss_timeout_s + self.watchdog_timeout_s

    def check(self) -> None:
        if min(self.beat_interval_s, self.loss_timeout_s, self.watchdog_timeout_s) <= 0:
            raise TimingError("agent timings must be > 0")
        if self.loss_timeout_s < 3 * self.beat_interval_s:
            raise TimingError(f"loss_timeout_s {self.loss_timeout_s:g} must be at least 3 beats "
                              f"({3 * self.beat_interval_s:g} s): one slow write must not reset the host")
        if self.watchdog_timeout_s < 2 * self.beat_interval_s:
            raise TimingError(f"watchdog_timeout_s {self.watchdog_timeout_s:g} must be at least 2 beats "
                              f"({2 * self.beat_interval_s:g} s): the watchdog must survive one late pet")


def required_stale_s(deadline_s: float, margin_s: float = DEFAULT_MARGIN_S) -> float:
    """The least `heartbeat_stale_s` a detector may use for a host that published `deadline_s`."""
    return deadline_s + margin_s


def fits(deadline_s: float, heartbeat_stale_s: float, margin_s: float = DEFAULT_MARGIN_S) -> bool:
    return heartbeat_stale_s >= required_stale_s(deadline_s, margin_s)


def check_pair(timing: AgentTiming, heartbeat_stale_s: float, margin_s: float = DEFAULT_MARGIN_S) -> None:
    """Both sides call this at start: refuse a detector threshold the agent's deadline does not fit under."""
    timing.check()
    if not fits(timing.self_fence_deadline_s, heartbeat_stale_s, margin_s):
        raise TimingError(
            f"timing rule broken: the agent's self-fence deadline {timing.self_fence_deadline_s:g} s (beat "
            f"{timing.beat_interval_s:g} + loss {timing.loss_timeout_s:g} + watchdog {timing.watchdog_timeout_s:g}) "
            f"+ margin {margin_s:g} s = {required_stale_s(timing.self_fence_deadline_s, margin_s):g} s is longer "
            f"than the detectors' heartbeat_stale_s {heartbeat_stale_s:g} s: a detector could declare the host "
            "dead while its VMs still run")


@dataclass(frozen=True)
class Heartbeat:
    host: str
    seq: int
    boot: str
    deadline_s: float  # math.inf unless status == "armed"
    isolation: Isolation = "fence"
    status: Status = "armed"

    @property
    def proves_self_fence(self) -> bool:
        """True only if this heartbeat promises that its host resets within `deadline_s` of going silent."""
        return self.status == "armed" and math.isfinite(self.deadline_s)

    def encode(self) -> bytes:
        deadline = self.deadline_s if self.proves_self_fence else None
        return json.dumps({"v": FORMAT_VERSION, "host": self.host, "seq": self.seq, "boot": self.boot,
                           "deadline_s": deadline, "isolation": self.isolation, "status": self.status},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        """Raises ValueError on anything that is not a heartbeat of this format (never trusted half-read)."""
        if len(raw) > MAX_HEARTBEAT_BYTES:
            raise ValueError(f"heartbeat of {len(raw)} bytes (> {MAX_HEARTBEAT_BYTES})")
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
            raise ValueError("not a version-1 heartbeat")
        host, seq, boot, deadline = data.get("host"), data.get("seq"), data.get("boot"), data.get("deadline_s")
        isolation, status = data.get("isolation", "fence"), data.get("status", "armed")
        if status != "armed" and status in STATUSES and deadline is None:
            deadline = math.inf  # promises nothing
        if not (isinstance(host, str) and isinstance(seq, int) and isinstance(boot, str)
                and isinstance(deadline, int | float) and deadline > 0 and isolation in ("fence", "storage-only")
                and status in STATUSES):
            raise ValueError("heartbeat fields missing or of the wrong type")
        return cls(host, seq, boot, float(deadline), isolation, status)


def detector_document(heartbeat_stale_s: float, margin_s: float = DEFAULT_MARGIN_S) -> bytes:
    """What the detectors publish in the heartbeat directory for the agents' start-up check."""
    return json.dumps({"v": FORMAT_VERSION, "heartbeat_stale_s": heartbeat_stale_s, "margin_s": margin_s}).encode()


def read_detector_document(raw: bytes) -> tuple[float, float]:
    """(heartbeat_stale_s, margin_s); ValueError if malformed."""
    if len(raw) > MAX_HEARTBEAT_BYTES:
        raise ValueError("detector document too large")
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
        raise ValueError("not a version-1 detector document")
    stale, margin = data.get("heartbeat_stale_s"), data.get("margin_s", DEFAULT_MARGIN_S)
    if not isinstance(stale, int | float) or not isinstance(margin, int | float) or stale <= 0 or margin < 0:
        raise ValueError("detector document fields missing or of the wrong type")
    return float(stale), float(margin)
