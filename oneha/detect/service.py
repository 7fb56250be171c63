"""The detector's loop: learn the hosts, probe them every round, share the view, decide suspect hosts.

The probe round never waits for oned (the host list is refreshed by its own task) nor for a decision (each runs as
its own task, its fence command in a thread): one slow BMC or oned must not delay the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time

import redis

from oneha.detect import metrics
from oneha.detect.beacon import serve
from oneha.detect.decide import Decider
from oneha.detect.heartbeats import HeartbeatWatch
from oneha.detect.misses import Misses, is_storm
from oneha.detect.probe import probe_round
from oneha.detect.quorum import Quorum
from oneha.detect.states import DEAD, OK, SUSPECT, HostStates
from oneha.detect.targets import Target, learn
from oneha.incidents import IncidentStore
from oneha.keys import Keys
from oneha.opennebula import OnedClient
from oneha.settings import Settings

log = logging.getLogger("oneha.detect")


class Detector:
    def __init__(self, settings: Settings, client: redis.Redis, oned: OnedClient, instance: str | None = None) -> None:
        d = self.d = settings.detect
        self.settings, self.oned = settings, oned
        self.instance = instance or d.instance or socket.gethostname()
        keys = Keys(settings.redis.key_prefix)
        self.store = IncidentStore(client, keys, settings.audit.retention_s, settings.audit.max_incidents)
        self.quorum = Quorum(client, keys, self.instance, d.alive_ttl_s)
        self.states = HostStates(client, keys, self.instance)
        self.misses = Misses()
        self.watch = HeartbeatWatch(d.heartbeat_dir, self.instance) if d.heartbeat_dir is not None else None
        self.targets: dict[int, Target] = {}
        self.suspects: set[int] = set()
        self.storm = False
        self.rounds = 0
        self.decider = Decider(settings, self.store, self.states, self.misses, self.watch, self.instance,
                               self.is_suspect)
        self.next_try: dict[int, float] = {}
        self.deciding: dict[int, asyncio.Task[None]] = {}
        self.beacon_port: int | None = None

    def is_suspect(self, hid: int) -> bool:
        """A quorum suspects it and this instance has not seen it answer since (re-checked before every action)."""
        return hid in self.suspects and self.misses.counts.get(hid, 0) > 0

    # The loop ----------------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        beacon = await serve(self.d.beacon_bind, self.d.beacon_port) if self.d.beacon_port is not None else None
        if beacon is not None:
            self.beacon_port = int(beacon.sockets[0].getsockname()[1])
        await self.refresh()
        refresher = asyncio.create_task(self._refresh_loop(stop))
        reader = asyncio.create_task(self._heartbeat_loop(stop)) if self.watch is not None else None
        try:
            while not stop.is_set():
                started = time.monotonic()
                await self.round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, started + self.d.probe_interval_s - time.monotonic()))
        finally:
            refresher.cancel()
            if reader is not None:
                reader.cancel()
            for task in list(self.deciding.values()):
                task.cancel()
            if beacon is not None:
                beacon.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.quorum.withdraw)

    async def round(self) -> None:
        targets = self.targets
        started = time.monotonic()
        results = await probe_round({h: t.address for h, t in targets.items()}, self.d.ports, self.d.probe_timeout_s,
                                    self.d.probe_source_address, self.d.probe_concurrency)
        now = time.monotonic()
        metrics.ROUND.observe(now - started)
        self.misses.update(results, now)
        self.rounds += 1
        self._storm_guard(len(targets))
        try:
            await asyncio.to_thread(self._share, targets)
        except redis.RedisError as exc:  # no shared view: no suspicion, no decision (fail safe), next round again
            self.suspects = set()
            metrics.ERRORS.labels("redis").inc()
            log.warning("detector: Redis unavailable", extra={"kv": {"error": str(exc)}})
            return
        self._schedule(now)

    def _storm_guard(self, total: int) -> None:
        missing = self.misses.missing()
        metrics.MISSING.set(missing)
        storm = is_storm(missing, total, self.d.storm_max_share, self.d.storm_min_hosts)
        if storm != self.storm:
            level = logging.ERROR if storm else logging.WARNING
            log.log(level, "detector suspects itself: votes withdrawn" if storm else "detector trusts itself again",
                    extra={"kv": {"instance": self.instance, "missing": missing, "hosts": total}})
        self.storm = storm
        metrics.STORM.set(1 if storm else 0)

    def _share(self, targets: dict[int, Target]) -> None:
        """Publish this instance's votes (none while it suspects itself), read the quorum's suspects, and bring the
        live view's states in line: suspect when a quorum misses it, ok when it answers again."""
        self.quorum.publish({} if self.storm else self.misses.votes(self.d.misses_to_suspect))
        suspects, alive = self.quorum.suspects(self.d.misses_to_suspect, self.d.quorum)
        self.suspects = suspects & set(targets)
        metrics.SUSPECT.set(len(self.suspects))
        metrics.ALIVE.set(alive)
        self.states.refresh()
        for hid in targets:
            state = self.states.state(hid)
            if hid in self.suspects:
                if state == OK:
                    self.states.set(hid, SUSPECT, f"missed {self.d.misses_to_suspect} probes in a row by a quorum "
                                                  f"of {self.d.quorum} detectors")
            elif state != OK and not (state == DEAD and self.misses.counts.get(hid, 0) > 0):
                self.states.set(hid, OK, "answers again" if self.misses.counts.get(hid) == 0 else "not suspect")
                self.decider.forget(hid)
                self.next_try.pop(hid, None)

    def _schedule(self, now: float) -> None:
        if self.storm:
            return  # an instance that suspects itself proves nothing
        for hid in sorted(self.suspects):
            if hid in self.deciding or now < self.next_try.get(hid, 0.0) or self.states.state(hid) == DEAD:
                continue
            if not self.is_suspect(hid):
                continue
            self.next_try[hid] = now + self.d.probe_interval_s
            task = asyncio.create_task(self._decide(self.targets[hid]))
            self.deciding[hid] = task
            task.add_done_callback(functools.partial(self._done, hid))

    def _done(self, hid: int, _task: asyncio.Task[None]) -> None:
        self.deciding.pop(hid, None)

    async def _decide(self, target: Target) -> None:
        try:
            outcome = await self.decider.decide(target)
        except Exception as exc:  # a decision that failed is taken again next round (every step repeats safely)
            metrics.ERRORS.labels("decision").inc()
            log.exception("decision failed", extra={"kv": {"host": target.id, "error": str(exc)}})
            return
        log.debug("decision", extra={"kv": {"host": target.id, "outcome": outcome}})

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """The heartbeats are read beside the probe rounds, never in them: a hung storage mount must not stop the
        probes (the watch then reports an unhealthy view, and no heartbeat decides anything)."""
        assert self.watch is not None
        while not stop.is_set():
            started = time.monotonic()
            names = [t.name for t in self.targets.values()]
            try:
                await asyncio.to_thread(self.watch.poll, names, started, self.d.heartbeat_fresh_s)
            except Exception as exc:
                metrics.ERRORS.labels("heartbeat_dir").inc()
                log.warning("detector: cannot read the heartbeats", extra={"kv": {"error": str(exc)}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, started + self.d.probe_interval_s - time.monotonic()))

    # Hosts from oned -----------------------------------------------------------------------------------------------
    async def _refresh_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.d.hosts_refresh_s)
            if not stop.is_set():
                await self.refresh()

    async def refresh(self) -> None:
        try:
            targets, unresolved = await asyncio.to_thread(learn, self.oned)
        except Exception as exc:  # oned down: keep probing the hosts we know
            metrics.ERRORS.labels("oned").inc()
            log.warning("detector: cannot read the host pool", extra={"kv": {"error": f"{type(exc).__name__}"}})
            return
        if unresolved:
            log.error("hosts not probed: address does not resolve", extra={"kv": {"hosts": unresolved[:20]}})
        self.targets = targets
        self.misses.keep_only(targets)
        metrics.HOSTS.set(len(targets))
        metrics.UNRESOLVED.set(len(unresolved))
        if self.watch is not None and not await asyncio.to_thread(
                self.watch.publish_threshold, self.d.heartbeat_stale_s, self.d.heartbeat_margin_s):
            metrics.ERRORS.labels("heartbeat_dir").inc()
