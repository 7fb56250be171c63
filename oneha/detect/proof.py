"""What the storage heartbeat proves about a suspect host: pure decisions, no I/O (issue 13, "proof before recovery").

    beating   it changed within heartbeat_fresh_s: the host runs (its VMs too); never fence it, never recover.
    dead      unchanged for longer than heartbeat_stale_s on this detector's clock, the host's own published
              self-fence deadline plus the margin fits in that (timing_rule.fits), the agent was beating when the
              host stopped answering, and this detector's view of the directory is healthy.
    unproven  anything else: the heartbeat proves nothing either way (no agent, stopped long before, a deadline
              that does not fit, a detector that cannot trust its own view of the storage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from oneha.timing_rule import fits

Verdict = Literal["beating", "dead", "unproven"]


@dataclass(frozen=True)
class Evidence:
    now: float  # this detector's monotonic clock
    changed_at: float | None  # when this detector last saw the heartbeat change (None: never)
    deadline_s: float | None  # the self-fence deadline the host published
    last_answer: float | None  # when this detector last saw the host answer its probes (None: never)
    dir_healthy: bool


@dataclass(frozen=True)
class Rule:
    stale_s: float
    margin_s: float
    fresh_s: float


def verdict(ev: Evidence, rule: Rule) -> tuple[Verdict, str]:
    if ev.changed_at is not None and ev.now - ev.changed_at <= rule.fresh_s:
        return "beating", f"storage heartbeat changed {ev.now - ev.changed_at:.1f}s ago: the host runs"
    if ev.changed_at is None:
        return "unproven", "no heartbeat seen beating (no agent on the host?)"
    if not ev.dir_healthy:
        return "unproven", "this detector's view of the heartbeat directory is not healthy"
    if ev.last_answer is None:
        return "unproven", "this detector never saw the host answer (started after it failed)"
    if ev.changed_at < ev.last_answer - rule.fresh_s:
        # The agent had stopped before the host stopped answering: it was not there to fence the host.
        return "unproven", "the heartbeat had stopped before the host stopped answering (agent not running)"
    if ev.deadline_s is None or not fits(ev.deadline_s, rule.stale_s, rule.margin_s):
        return "unproven", (f"the host's self-fence deadline {ev.deadline_s}s + margin {rule.margin_s:g}s does not "
                            f"fit in heartbeat_stale_s {rule.stale_s:g}s")
    stale = ev.now - ev.changed_at
    if stale <= rule.stale_s:
        return "unproven", f"heartbeat unchanged for {stale:.1f}s, proof after {rule.stale_s:g}s"
    return "dead", (f"heartbeat unchanged for {stale:.1f}s > {rule.stale_s:g}s (self-fence deadline "
                    f"{ev.deadline_s:g}s + margin {rule.margin_s:g}s)")
