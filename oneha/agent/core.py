"""The agent's decisions, pure: no clock, no file, no socket (the service and the lab's hosts feed it).

Each beat the shell tells the core what it saw (`wrote`: a heartbeat write that started at t succeeded; `saw_detector`:
a detector accepted a connection at t), then asks `beat(now)`. The rule (oneha/timing_rule.py): pet only while the
last successful write and, with isolation = "fence", the last detector contact are younger than loss_timeout_s.
Times are the *start* of the write or probe: a write that started at t landed after t, so every detector sees it at
t or later, and the host resets before t + loss_timeout_s + watchdog_timeout_s (the last pet came before
t + loss_timeout_s).

Arming: the watchdog is armed only once everything the pet depends on has been seen since start (the storage, and a
detector with isolation = "fence"). A host that boots into a partition therefore never arms, and cannot
reboot-loop; until armed its heartbeats say "unarmed" and promise nothing, so no detector takes its silence for
proof. Once armed the watchdog is never disarmed except by a clean stop (`stop`), which first writes a heartbeat
saying "stopped".
"""

from __future__ import annotations

from dataclasses import dataclass

from oneha.timing_rule import AgentTiming, Heartbeat, Isolation, Status


@dataclass(frozen=True)
class Decision:
    arm: bool  # open and arm the watchdog now (it pets it too)
    pet: bool
    reason: str  # what the agent sees, for the log (logged when it changes)


class AgentCore:
    def __init__(self, host: str, boot: str, timing: AgentTiming, isolation: Isolation = "fence",
                 watchdog: bool = True, first_seq: int = 0) -> None:
        timing.check()
        self.host, self.boot, self.timing, self.isolation, self.watchdog = host, boot, timing, isolation, watchdog
        self.seq = first_seq
        self.armed = False
        self.stopped = False
        self.last_write: float | None = None
        self.last_detector: float | None = None

    @property
    def status(self) -> Status:
        if self.stopped:
            return "stopped"
        if not self.watchdog:
            return "no-watchdog"
        return "armed" if self.armed else "unarmed"

    def next_heartbeat(self) -> Heartbeat:
        """The heartbeat to write this beat: a new seq each time, and the guarantee only while armed."""
        self.seq += 1
        return Heartbeat(self.host, self.seq, self.boot, self.timing.self_fence_deadline_s, self.isolation,
                         self.status)

    def wrote(self, started_at: float) -> None:
        """A heartbeat write that started at `started_at` completed (late completions count from their start)."""
        if self.last_write is None or started_at > self.last_write:
            self.last_write = started_at

    def saw_detector(self, at: float) -> None:
        if self.last_detector is None or at > self.last_detector:
            self.last_detector = at

    def _fresh(self, last: float | None, now: float) -> bool:
        return last is not None and now - last < self.timing.loss_timeout_s

    def lost(self, now: float) -> list[str]:
        """What the pet is missing now: "storage", "every detector" (empty: everything is fresh)."""
        lost = []
        if not self._fresh(self.last_write, now):
            lost.append("storage")
        if self.isolation == "fence" and not self._fresh(self.last_detector, now):
            lost.append("every detector")
        return lost

    def _describe(self, lost: list[str], now: float) -> str:
        ages = {"storage": self.last_write, "every detector": self.last_detector}
        return ", ".join(name + _age(ages[name], now) for name in lost)

    def beat(self, now: float) -> Decision:
        if self.stopped:
            return Decision(False, False, "stopped")
        lost = self.lost(now)
        if not self.watchdog:
            return Decision(False, False, "no watchdog, heartbeats promise nothing"
                            + (": lost " + self._describe(lost, now) if lost else ""))
        if not self.armed:
            if lost:
                return Decision(False, False, "not armed yet: waiting to see " + self._describe(lost, now))
            return Decision(True, True, "arming: storage" + (" and a detector" if self.isolation == "fence" else "")
                            + " seen")
        if lost:
            return Decision(False, False, f"NOT PETTING: lost {self._describe(lost, now)}, loss_timeout_s "
                                          f"{self.timing.loss_timeout_s:g}: the watchdog resets this host within "
                                          f"{self.timing.watchdog_timeout_s:g} s unless it comes back")
        return Decision(False, True, "petting: storage" + (" and a detector" if self.isolation == "fence" else "")
                        + " seen")

    def armed_now(self) -> None:
        """The shell armed the watchdog (its timeout read back within the rule)."""
        self.armed = True

    def stop(self) -> Heartbeat:
        """The final heartbeat of a clean stop: it promises nothing. Disarm only once it is written."""
        self.stopped = True
        return self.next_heartbeat()


def _age(last: float | None, now: float) -> str:
    return " (never seen)" if last is None else f" ({now - last:.1f} s ago)"
