"""The periodic scan that makes the subscriber independent of ever receiving an event.

Fast pass (every reconcile_interval_s): one `one.hostpool.info`. Hosts in ERROR are reported; healthy hosts cancel
incidents still in their grace period and lose their handled markers. The VMs of hosts in ERROR, DISABLED or
OFFLINE (from the pool's VMS/ID lists) are read with one short `one.vmpool.infoset` per chunk, and those in UNKNOWN or
a failure state are read again extended (the short body has no HA attribute) and reported: this covers a missed
event and the DISABLED host whose VMs went UNKNOWN with no host event at all. Cost: one host pool
read plus the VMs of unhealthy hosts only, never the whole VM pool.

Full pass (every full_scan_interval_s): the ACTIVE and the POWEROFF VMs of the whole pool, read in ID-range pages
(`one.vmpool.info(-2, start, end, state)`: start/end are VM IDs, REFERENCE §4), for crashes on healthy hosts, failure
states and poweroffs nobody asked for; VM handled markers of VMs no longer failing are cleared, so their next
failure opens a new incident.

Every pass also refreshes the cheap gauges (open incidents, Celery queue lengths) from Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from oneha.incidents import IncidentStore
from oneha.keys import HOST_QUEUE, VM_QUEUE
from oneha.opennebula import (
    HOST_FAILED_STATES,
    HOST_HEALTHY_STATES,
    HOST_OPERATOR_STATES,
    HostEvent,
    HostView,
    OnedClient,
    VmEvent,
    VmState,
    VmView,
)
from oneha.settings import SubscriberSettings
from oneha.subscriber import metrics
from oneha.subscriber.intake import RECONCILER, Intake, Outcome, failure_kind
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.reconciler")

# ACTIVE: crashes (UNKNOWN) and failure states; POWEROFF: poweroffs nobody asked for (the short body keeps the last
# history record's ACTION, which tells them apart).
SCANNED_STATES = (VmState.ACTIVE, VmState.POWEROFF)


@dataclass
class PassStats:
    scan: str
    hosts: int = 0
    vms: int = 0
    oned_calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"scan": self.scan, "hosts": self.hosts, "vms": self.vms, "oned_calls": self.oned_calls,
                "seconds": round(self.seconds, 4), **{f"n_{k}": v for k, v in self.outcomes.items()}}


def is_refused(exc: BaseException) -> bool:
    """oned answered AUTHENTICATION: the session is wrong, which no retry fixes (a service started while oned was
    down could not tell at start)."""
    import pyone

    return isinstance(exc, pyone.OneAuthenticationException)


def chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


class Reconciler:
    def __init__(self, oned: Callable[[], OnedClient], intake: Intake, store: IncidentStore,
                 interval_s: float, full_interval_s: float, stop: threading.Event,
                 broker: redis.Redis | None = None, on_refused: Callable[[str], None] | None = None,
                 tuning: SubscriberSettings | None = None) -> None:
        self.oned = oned
        self.tuning = tuning or SubscriberSettings()  # the reconcile_* poke and page sizes
        self.on_refused = on_refused  # oned refused our credentials: retrying cannot help
        self.intake = intake
        self.store = store
        self.interval_s = interval_s
        self.full_interval_s = full_interval_s
        self.stop = stop
        self.broker = broker
        self._next_full = 0.0  # the first pass is full: after a restart, everything is looked at once
        self.passes = 0
        self._poked = threading.Event()

    def poke(self) -> None:
        """Look at the host pool again soon (at most every reconcile_poke_min_s): an event oned contradicted may only
        have been ahead of oned's database (HostPool::update publishes before it writes the host)."""
        self._poked.set()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.tick()
            self._wait(started)

    def _wait(self, started: float) -> None:
        """Until the next pass: the interval, or a poke at least reconcile_poke_min_s after the last pass began."""
        while not self.stop.is_set():
            now = time.monotonic()
            poke_due = self._poked.is_set() and now - started >= self.tuning.reconcile_poke_min_s
            if now - started >= self.interval_s or poke_due:
                self._poked.clear()
                return
            self.stop.wait(min(0.2, self.interval_s))  # loop period: notices stop and pokes

    def tick(self) -> list[PassStats]:
        """One pass (plus a full one when due). Never raises: errors are logged, counted, retried next tick."""
        done: list[PassStats] = []
        full_due = time.monotonic() >= self._next_full
        for scan, fn in (("hosts", self.fast_pass), ("full", self.full_pass)):
            if scan == "full" and not full_due:
                continue
            stats = PassStats(scan)
            start = time.perf_counter()
            try:
                fn(stats)
            except redis.RedisError as exc:
                metrics.REDIS_ERRORS.labels("reconciler").inc()
                log.warning("reconcile: redis unavailable", extra=kv(scan=scan, error=type(exc).__name__))
                continue
            except Exception as exc:  # oned down, timeouts, unparsable replies
                metrics.ONED_ERRORS.labels("reconciler").inc()
                log.warning("reconcile: oned call failed", extra=kv(scan=scan, error=type(exc).__name__,
                                                                     detail=str(exc)[:200]))
                if self.on_refused is not None and is_refused(exc):
                    self.on_refused(f"oned refused the credentials: {str(exc)[:200]}")
                continue
            stats.seconds = time.perf_counter() - start
            metrics.RECONCILE_DURATION.labels(scan).observe(stats.seconds)
            if scan == "full":
                self._next_full = time.monotonic() + self.full_interval_s
            log.info("reconcile pass", extra=kv(**stats.as_dict()))
            done.append(stats)
        self.gauges()
        self.passes += 1
        return done

    # -- fast pass ----------------------------------------------------------------------------------------------

    def fast_pass(self, stats: PassStats) -> None:
        started = time.time()
        hosts = self.oned().host_pool()
        stats.oned_calls += 1
        stats.hosts = len(hosts)
        for host in hosts:
            if host.state in HOST_FAILED_STATES:
                self._feed(HostEvent(host.id, host.state, host), stats)
        self._healthy_hosts([h for h in hosts if h.state in HOST_HEALTHY_STATES], started, stats)
        suspect = [vid for h in hosts if h.state in HOST_FAILED_STATES | HOST_OPERATOR_STATES for vid in h.vm_ids]
        for chunk in chunks(sorted(set(suspect)), self.tuning.reconcile_infoset_chunk_vms):
            vms = self.oned().vm_pool_set(chunk)
            stats.oned_calls += 1
            self._vms(vms, stats)

    def _healthy_hosts(self, healthy: list[HostView], scan_started: float, stats: PassStats) -> None:
        if not healthy:
            return
        ids = self.store.open_incident_ids("host", [h.id for h in healthy])
        opened = [(h, i) for h, i in zip(healthy, ids, strict=True) if i is not None]
        for host, incident_id in opened:
            incident = self.store.get(incident_id)
            # Only what was opened before this pass read the pool: a failure reported since is newer than our view.
            if incident is not None and incident.opened_at < scan_started:
                self._feed(HostEvent(host.id, host.state, host), stats)
        handled = self.store.handled_ids("host")
        back = [h.id for h in healthy if h.id in handled]
        if back:
            self.store.clear_handled("host", back)
            stats.outcomes["host_handled_cleared"] += len(back)

    # -- full pass ----------------------------------------------------------------------------------------------

    def full_pass(self, stats: PassStats) -> None:
        hosts = {h.id: h for h in self.oned().host_pool()}
        stats.oned_calls += 1
        max_id = max((vid for h in hosts.values() for vid in h.vm_ids), default=-1)
        failing: set[int] = set()
        for state in SCANNED_STATES:
            for vms in self._pages(max_id, state, stats):
                failing |= {vm.id for vm in vms if _failing(vm)}
                self._vms(vms, stats)
        handled = self.store.handled_ids("vm")
        healed = [vid for vid in handled if vid not in failing]
        if healed:
            self.store.clear_handled("vm", healed)
            stats.outcomes["vm_handled_cleared"] += len(healed)

    def _pages(self, max_known_id: int, state: VmState, stats: PassStats) -> Iterable[list[VmView]]:
        """VMs in `state` in ID-range pages, up to the highest ID any host lists (and on while pages are not empty)."""
        server = self.oned().server
        start = 0
        while True:
            pool = server.vmpool.info(-2, start, start + self.tuning.reconcile_page_vms - 1, int(state))
            stats.oned_calls += 1
            vms = [VmView.from_pyone(v) for v in (pool.VM or [])]
            yield vms
            start += self.tuning.reconcile_page_vms
            if not vms and start > max_known_id:
                return

    # -- shared -------------------------------------------------------------------------------------------------

    def _vms(self, vms: list[VmView], stats: PassStats) -> None:
        stats.vms += len(vms)
        failing = [vm.id for vm in vms if _failing(vm)]
        # Pool reads give oned's short bodies, which carry no HA / HA_PRIORITY (`to_xml_short`): intake's opt-out
        # check needs the extended body, read for the failing VMs only (one call per chunk, usually none).
        for chunk in chunks(failing, self.tuning.reconcile_infoset_chunk_vms):
            extended = self.oned().vm_pool_set(chunk, extended=True)
            stats.oned_calls += 1
            for vm in extended:
                if _failing(vm):
                    self._feed(VmEvent(vm.id, vm.state, vm.lcm_state, vm), stats)

    def _feed(self, event: HostEvent | VmEvent, stats: PassStats) -> None:
        result = self.intake.handle(event, RECONCILER)
        stats.outcomes[result.outcome.value] += 1
        if result.outcome is Outcome.OPENED:
            log.info("reconciler found an unreported failure", extra=kv(incident=result.incident_id))

    def gauges(self) -> None:
        try:
            counts = self.open_counts()
            metrics.INCIDENTS_OPEN.clear()
            for (kind, status), n in counts.items():
                metrics.INCIDENTS_OPEN.labels(kind, status).set(n)
            metrics.RECOVERY_PAUSED.set(0 if self.store.paused() is None else 1)
            if self.broker is not None:
                pipe = self.broker.pipeline(transaction=False)
                for queue in (HOST_QUEUE, VM_QUEUE):
                    pipe.llen(queue)
                for queue, n in zip((HOST_QUEUE, VM_QUEUE), pipe.execute(), strict=True):
                    metrics.QUEUE_LENGTH.labels(queue).set(n)
        except redis.RedisError as exc:
            log.warning("gauges: redis unavailable", extra=kv(error=type(exc).__name__))

    def open_counts(self) -> Counter[tuple[str, str]]:
        return self.store.open_counts()


def _failing(vm: VmView) -> bool:
    return failure_kind(VmEvent(vm.id, vm.state, vm.lcm_state, vm)) is not None
