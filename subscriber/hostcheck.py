"""Events are hints: before a host event opens or cancels a host incident, ask oned what the host is now.

ZeroMQ has no authentication: anyone who can reach a subscriber's SUB socket's publisher port (or publish on a
socket it is subscribed to) can forge `EVENT STATE HOST/MONITORED//N `. Believed as it came, one forged frame per
second kept a dead host from being recovered for a whole minute (every incident the reconciler opened was
cancelled "host back"); a forged ERROR for a healthy host made a real VM crash on it wait as "owned by the host
incident". So intake acts on a host event from an input other than oned's own pool read only when oned agrees:

- MONITORED cancels a waiting incident only if oned says the host is healthy; if oned says otherwise, or cannot be
  read, nothing is cancelled (in doubt, do nothing: the worker re-reads the host at the due time anyway).
- ERROR opens an incident only if oned does not say the host is healthy; if oned cannot be read, it opens (the
  worker confirms the failure before anything is done, so opening is safe). oned publishes a host's state change
  before it writes the host to its database (src/host/HostPool.cc, `HostPool::update`), so a read racing a real
  ERROR event may still see the old state: a contradicted ERROR pokes the reconciler, whose host pool read (at
  most `POKE_MIN_S` later) opens the incident if the failure is real. A real failure is delayed, never lost.

oned's answer is cached per host for `max_age_s`; one that contradicts an event counts only if it was read after
the event arrived (else it may predate the change the event reports, and oned is asked again). Reads are capped
at `max_reads_per_s` (beyond: "cannot be read"), so a flood of forged frames costs oned at most that many
reads. Every disagreement is counted (`oneha_event_disagreements_total`); `alert_after` of them within
`alert_window_s` for one host log an alert.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from oneha.opennebula import HOST_HEALTHY_STATES, HostEvent, HostState, OnedClient
from oneha.subscriber import metrics
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.hostcheck")


class HostCheck:
    """Thread-safe; one per subscriber process."""

    def __init__(self, oned: Callable[[], OnedClient], max_age_s: float = 1.0, max_reads_per_s: float = 20.0,
                 alert_after: int = 3, alert_window_s: float = 60.0,
                 on_contradicted_failure: Callable[[], object] | None = None) -> None:
        self.oned = oned
        self.on_contradicted_failure = on_contradicted_failure
        self.max_age_s = max_age_s
        self.max_reads_per_s = max_reads_per_s
        self.alert_after = alert_after
        self.alert_window_s = alert_window_s
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[float, HostState | None]] = {}  # host -> (read at (wall), state; None = unreadable)
        self._reads: deque[float] = deque()
        self._disagreements: dict[int, deque[float]] = {}
        self._alerted: dict[int, float] = {}
        self._logged: dict[int, float] = {}  # host -> last warning (one a second per host: floods stay quiet)

    def state(self, host_id: int, read_after: float = 0.0) -> HostState | None:
        """oned's state of the host (at most `max_age_s` old and read after `read_after`, wall clock), or None
        when oned cannot say."""
        now = time.time()
        with self._lock:
            cached = self._seen.get(host_id)
            # A failed read is trusted longer: a hung oned must not stall the listener thread on every event.
            if cached is not None and now - cached[0] < self.max_age_s * (1 if cached[1] is not None else 5) and \
                    (cached[0] >= read_after or cached[1] is None):
                return cached[1]
            while self._reads and not 0 <= now - self._reads[0] < 1.0:
                self._reads.popleft()
            if len(self._reads) >= self.max_reads_per_s:
                return None
            self._reads.append(now)
        try:
            state: HostState | None = self.oned().host_info(host_id).state
        except Exception as exc:  # oned down, host gone: cannot confirm either way
            metrics.ONED_ERRORS.labels("hostcheck").inc()
            log.warning("cannot read host from oned to check an event", extra=kv(host=host_id,
                                                                                   error=type(exc).__name__))
            state = None
        with self._lock:
            if len(self._seen) > 10_000:  # bounded: forged ids must not grow it without end
                self._seen.clear()
            self._seen[host_id] = (now, state)  # taken before the read: "read after" errs towards reading again
        return state

    def confirms(self, event: HostEvent, source: str, received_at: float) -> bool | None:
        """Does oned agree with the event (received at `received_at`, wall clock)? None when oned cannot say.
        A disagreement is counted (and alerted)."""
        healthy_event = event.state in HOST_HEALTHY_STATES

        def agree(state: HostState) -> bool:
            return (state in HOST_HEALTHY_STATES) if healthy_event else (state not in HOST_HEALTHY_STATES)

        state = self.state(event.host_id)
        if state is not None and not agree(state):
            state = self.state(event.host_id, read_after=received_at)  # not older than the event it contradicts
        if state is None:
            return None
        agrees = agree(state)
        if not agrees:
            self._disagree(event, state, source)
        return agrees

    def _disagree(self, event: HostEvent, state: HostState, source: str) -> None:
        label = "host_healthy" if event.state in HOST_HEALTHY_STATES else "host_error"
        if label == "host_error" and self.on_contradicted_failure is not None:
            self.on_contradicted_failure()  # the reconciler looks again soon: a real ERROR is at most delayed
        metrics.EVENT_DISAGREEMENTS.labels(source, label).inc()
        now = time.monotonic()
        fields = kv(host=event.host_id, event=event.state.name, oned=state.name, source=source)
        with self._lock:
            seen = self._disagreements.setdefault(event.host_id, deque())
            seen.append(now)
            while seen and now - seen[0] > self.alert_window_s:
                seen.popleft()
            repeated = len(seen) >= self.alert_after
            alert = repeated and now - self._alerted.get(event.host_id, -1e9) > self.alert_window_s
            if alert:
                self._alerted[event.host_id] = now
            warn = now - self._logged.get(event.host_id, -1e9) >= 1.0
            if warn:
                self._logged[event.host_id] = now
            if len(self._disagreements) > 10_000:
                self._disagreements.clear()
                self._logged.clear()
        if alert:
            log.error("ALERT: events and oned disagree repeatedly about a host (forged events on the ZeroMQ "
                      "port?); events are ignored where oned disagrees", extra=fields)
        elif warn:
            log.warning("event contradicted by oned: ignored", extra=fields)
