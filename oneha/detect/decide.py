"""The decision on one suspect host (issue 13, "proof before recovery"), taken by the one instance holding its
decision lease. Every step is safe to repeat: a detector killed mid-decision is replaced when its lease expires.

Order: (0) a heartbeat that still beats vetoes everything: the host runs its VMs, it is isolated (alert, never fence,
never recover); (1) the cluster's fence command (exit 0 = the BMC read back Off, after a ForceOff if it was On) ->
dead, proof "bmc"; (2) the BMC failed: the storage heartbeat may prove death (proof.verdict) -> dead, proof
"heartbeat"; otherwise unproven: alert and wait for oned. Suspicion is re-checked before each action.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oneha.detect import metrics
from oneha.detect.heartbeats import HeartbeatWatch
from oneha.detect.lease import DecisionLease
from oneha.detect.misses import Misses
from oneha.detect.proof import Evidence, Rule, Verdict, verdict
from oneha.detect.states import DEAD, ISOLATED, SUSPECT, HostStates
from oneha.detect.targets import Target
from oneha.incidents import IncidentStore
from oneha.settings import Settings
from oneha.workers.fence import FenceResult, run_fence

log = logging.getLogger("oneha.detect.decide")
WAITS_FOR_ONED = "never recovered by the detector: oneha waits for oned"


@dataclass
class Decider:
    settings: Settings
    store: IncidentStore
    states: HostStates
    misses: Misses
    watch: HeartbeatWatch | None
    instance: str
    is_suspect: Callable[[int], bool]
    bmc_failed: dict[int, tuple[float, str]] = field(default_factory=dict)  # host -> (when, why) of its last fence

    @property
    def rule(self) -> Rule:
        d = self.settings.detect
        return Rule(d.heartbeat_stale_s, d.heartbeat_margin_s, d.heartbeat_fresh_s)

    def heartbeat(self, target: Target) -> tuple[Verdict, str]:
        if self.watch is None:
            return "unproven", "no heartbeat directory configured"
        now = time.monotonic()
        ev = Evidence(now, self.watch.changed_at(target.name), self.watch.deadline_s(target.name),
                      self.misses.last_answer.get(target.id), self._view_healthy(target))
        return verdict(ev, self.rule)

    def _view_healthy(self, target: Target) -> bool:
        assert self.watch is not None
        return self.watch.healthy(target.name, time.monotonic(), self.settings.detect.heartbeat_fresh_s)

    async def decide(self, target: Target) -> str:
        """Take the host's lease and decide; the outcome: dead | isolated | unproven | cleared | busy."""
        lease = DecisionLease(self.store.r, self.store.keys, target.id, self.instance,
                              self.settings.detect.decision_lease_s)
        if not await asyncio.to_thread(lease.acquire):
            return "busy"
        policy = self.settings.policy.for_cluster(target.host.cluster_id)
        # Renewed for as long as a decision can take (the fence command's attempts and their backoff), no longer:
        # a decision stuck on a hung call must not keep the host from every other instance for ever.
        longest = policy.fence_timeout_s * policy.fence_attempts + 5.0 * policy.fence_attempts
        renewal = asyncio.create_task(self._renew(lease, time.monotonic() + longest))
        try:
            outcome = await self._decide(target)
        finally:
            renewal.cancel()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lease.release)
        metrics.DECISIONS.labels(outcome).inc()
        return outcome

    async def _renew(self, lease: DecisionLease, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(self.settings.detect.decision_lease_s / 3)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lease.renew)

    async def _decide(self, target: Target) -> str:
        hid = target.id
        found, why = self.heartbeat(target)
        if found == "beating":
            return await self._beating(target, why)
        if not self.is_suspect(hid):
            return "cleared"
        if self.watch is not None and self.watch.has_agent(target.name) and not self._view_healthy(target):
            # Its agent writes a heartbeat this detector cannot read now: "not beating" would mean nothing. Never
            # fence on that; another instance (with a healthy view) may decide.
            detail = f"unproven: this detector cannot read the heartbeat directory; {WAITS_FOR_ONED}"
            await asyncio.to_thread(self.states.set, hid, SUSPECT, detail)
            return "unproven"
        fence = await self._fence(target)
        if fence is not None and fence.result == "fenced":
            return await self._dead(target, "bmc", f"fence command: BMC read back Off ({fence.summary()})")
        found, why = self.heartbeat(target)  # time passed while the fence ran
        if found == "beating":
            return await self._beating(target, why)
        bmc = self.bmc_failed.get(hid, (0.0, "not tried"))[1]
        if found == "dead" and self.is_suspect(hid):
            return await self._dead(target, "heartbeat", f"{why}; BMC: {bmc}")
        detail = f"unproven: BMC: {bmc}; heartbeat: {why}; {WAITS_FOR_ONED}"
        if not str(self.states.current.get(hid, {}).get("detail", "")).startswith("unproven"):  # once, not per round
            log.warning("suspect host not proven dead", extra={"kv": {"host": hid, "detail": detail}})
        await asyncio.to_thread(self.states.set, hid, SUSPECT, detail)
        return "unproven"

    async def _fence(self, target: Target) -> FenceResult | None:
        """The cluster's fence command, unless it failed for this host less than decision_retry_s ago (a dead BMC
        is not asked again every round)."""
        last = self.bmc_failed.get(target.id)
        if last is not None and time.monotonic() - last[0] < self.settings.detect.decision_retry_s:
            return None
        policy = self.settings.policy.for_cluster(target.host.cluster_id)
        result = await asyncio.to_thread(run_fence, policy, target.host, None, self.settings.worker.fence_env)
        if result.result != "fenced":
            self.bmc_failed[target.id] = (time.monotonic(), result.summary())
        return result

    async def _beating(self, target: Target, why: str) -> str:
        """A fresh heartbeat vetoes fencing. Right after the host stopped answering it may be the last beats of a
        dead host: wait until the host has been silent for heartbeat_fresh_s before calling it isolated."""
        last = self.misses.last_answer.get(target.id)
        if last is not None and time.monotonic() - last <= self.settings.detect.heartbeat_fresh_s:
            return "waiting"
        return await self._isolated(target, why)

    async def _isolated(self, target: Target, why: str) -> str:
        detail = f"{why}; cut off from the detectors, not fenced, {WAITS_FOR_ONED}"
        if self.states.state(target.id) != ISOLATED:
            log.error("host isolated: it does not answer but its storage heartbeat beats",
                      extra={"kv": {"host": target.id, "detail": detail}})
        await asyncio.to_thread(self.states.set, target.id, ISOLATED, detail)
        return "isolated"

    async def _dead(self, target: Target, proof: str, detail: str) -> str:
        report = await asyncio.to_thread(
            self.store.report_proven_dead, target.id, target.host.cluster_id, f"detector:{self.instance}", proof,
            True, detail)
        log.warning("host proven dead", extra={"kv": {"host": target.id, "proof": proof, "detail": detail,
                                                      "incident": report.incident_id, "opened": report.opened}})
        metrics.PROVEN_DEAD.labels(proof).inc()
        await asyncio.to_thread(self.states.set, target.id, DEAD, detail, proof)
        return "dead"

    def forget(self, hid: int) -> None:
        """The host answers again: its next failure starts from scratch."""
        self.bmc_failed.pop(hid, None)
