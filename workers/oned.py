"""The oned gateway the flows use: pyone with timeouts, bounded retries, a global concurrency cap, batched reads.

- Every call goes through `OnedGateway.call`: it takes a slot of the pool-wide semaphore (a Redis sorted set of
  holders scored by expiry, `keys.oned_semaphore`; Lua acquire reaps expired holders, so a SIGKILLed worker cannot
  leak a slot), runs the pyone call, and classifies failures (`classify_error`): TRANSIENT is retried with
  exponential backoff and full jitter up to `oned.call_attempts`; PERMANENT and WRONG_STATE are raised at once as
  `OnedError` (WRONG_STATE goes back to the step, which re-reads and decides again).
- A mutating call (`vm_action`, `vm_recover`) is retried only when it surely never reached oned (connection never
  made) or oned answered with an error. Any other failure (no answer within the read timeout, a connection cut
  mid-call) is UNKNOWN: oned may have applied it, or may still apply it. It is never re-sent: the step re-reads
  the VM and decides again (`settle` first, see below).
- A call oned has not answered is not abandoned at the read timeout: the caller gets its answer (TRANSIENT for a
  read, UNKNOWN for a change) after `connect_timeout_s + read_timeout_s`, but the request runs on in a helper
  thread on its own connection, which keeps the call's semaphore slot (renewed in Redis) until oned answers or
  `abandon_after_s` passes and the connection is closed. So the cap bounds what oned has in hand, not only what
  callers wait for: a hung oned holds `max_concurrent_calls` requests of ours, no more (the lab counted 40
  against a cap of 4 when timed-out calls freed their slots). Until then, another change of the same VM is held
  back (`UNKNOWN` without sending; `settle(vm_id)` waits for the earlier call to end), so a late answer cannot
  cross a second action. What stays out of reach: a connection closed by us after `abandon_after_s` (or by a
  dead worker's kernel) does not cancel the request inside oned (xmlrpc-c runs a method to its end; the reply
  just fails to be written), so after that long our count can be below oned's. Such a change is *abandoned*
  (`abandoned(vm_id)`): oned may still apply it at any time, so the step does not decide again from a read that
  shows the VM unchanged (that could send a second change landing after the first): the VM is left with an alert
  (`CallOutcome.ABANDONED`, `vm_steps.run_call`).
- `OnedError` carries a sanitised message: the session string never reaches a log line, an exception or Flower.
- `VmReader` coalesces concurrent "re-read this VM" requests of all worker threads of a process into one
  `one.vmpool.infoset` call, so re-reading before every action and polling for confirmation costs a fraction of a
  call per VM instead of one call each (REFERENCE §5: one infoset call can serve many VMs).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

import redis

from oneha.backoff import full_jitter
from oneha.keys import Keys
from oneha.opennebula import (
    ErrorKind,
    HostStatus,
    HostView,
    OnedClient,
    RecoverOp,
    VmView,
    classify_error,
    is_no_exists,
    make_server,
)
from oneha.settings import OnedSettings
from oneha.waiting import WaitTimeout, wait_until

log = logging.getLogger(__name__)
T = TypeVar("T")


class OnedError(Exception):
    """A failed oned call after retries. `kind` says what the caller should do; the message holds no secret."""

    def __init__(self, method: str, kind: ErrorKind, message: str, attempts: int = 1, missing: bool = False) -> None:
        super().__init__(f"{method}: {kind.value}: {message}")
        self.method = method
        self.kind = kind
        self.attempts = attempts
        self.missing = missing  # oned said NO_EXISTS: the object is gone (a permanent error, but a final answer)


class CallObserver(Protocol):
    def oned_call(self, method: str, seconds: float, error: ErrorKind | None) -> None: ...

    def oned_retry(self, method: str) -> None: ...



# KEYS: semaphore zset. ARGV: holder, cap, ttl ms. Time from the Redis server, so worker clocks do not matter.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"""


# KEYS: semaphore zset. ARGV: ttl ms, holders...
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
return 1
"""


class OnedSemaphore:
    """A global cap on concurrent oned calls: holders in a sorted set scored by their expiry (ms, Redis time).

    With `reuse_s` > 0 a process keeps a slot it has just released for its next call instead of handing it back
    at once (a busy process then pays no Redis round trip per call, instead of two). Safe for the cap: a kept slot
    stays in the sorted set, so it still counts; it is reused only within `reuse_s` of when it was taken (the
    caller picks `reuse_s` so that a call started then still ends before the slot's expiry); and a slot idle for
    `idle_s` is handed back by a reaper thread, so other processes get it. A dead process's slots expire as before.
    """

    def __init__(self, client: redis.Redis, key: str, cap: int, ttl_s: float, reuse_s: float = 0.0,
                 idle_s: float = 0.02) -> None:
        self.r = client
        self.key = key
        self.cap = cap
        self.ttl_ms = int(ttl_s * 1000)
        self.reuse_s = reuse_s
        self.idle_s = idle_s
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        # In front of the Redis semaphore: threads of one process never contend for more slots than exist, so
        # they wait on a local condition instead of polling Redis.
        self._local = threading.BoundedSemaphore(cap)
        self._taken_at: dict[str, float] = {}  # holder -> monotonic time before it was taken (kept slots only)
        self._idle: list[tuple[str, float]] = []  # kept slots: (holder, released at), most recent last
        self._stale: list[str] = []  # kept slots too old to reuse, to hand back
        self._cond = threading.Condition()
        self._reaper: threading.Thread | None = None

    def try_acquire(self, holder: str) -> bool:
        return bool(self._acquire(keys=[self.key], args=[holder, self.cap, self.ttl_ms]))

    def acquire(self, timeout_s: float) -> str:
        if not self._local.acquire(timeout=timeout_s):
            raise OnedError("semaphore", ErrorKind.TRANSIENT, "no oned call slot free")
        try:
            kept = self._take_kept()
            if kept is not None:
                return kept
            holder = uuid.uuid4().hex
            taken = time.monotonic()
            wait_until(lambda: self.try_acquire(holder), timeout_s, interval_s=0.002, backoff=1.3,
                       max_interval_s=0.02, what="an oned call slot")
        except BaseException as exc:
            self._local.release()
            if isinstance(exc, WaitTimeout):
                raise OnedError("semaphore", ErrorKind.TRANSIENT, "no oned call slot free") from exc
            raise
        if self.reuse_s > 0:
            with self._cond:
                self._taken_at[holder] = taken
        return holder

    def _take_kept(self) -> str | None:
        if self.reuse_s <= 0:
            return None
        now = time.monotonic()
        with self._cond:
            while self._idle:
                holder, _ = self._idle.pop()
                if now - self._taken_at.get(holder, 0.0) < self.reuse_s:
                    return holder
                self._stale.append(holder)  # too old to trust its expiry: the reaper hands it back
                self._cond.notify()
        return None

    def release(self, holder: str) -> None:
        try:
            if self.reuse_s > 0 and holder in self._taken_at:
                with self._cond:
                    self._idle.append((holder, time.monotonic()))
                    self._ensure_reaper()
                    self._cond.notify()
            else:
                self.r.zrem(self.key, holder)
        finally:
            self._local.release()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="oneha-oned-slots", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Hand back slots idle for `idle_s` (and those too old to reuse), one ZREM for all of them."""
        while True:
            with self._cond:
                while not self._idle and not self._stale:
                    self._cond.wait()
                now = time.monotonic()
                old = [h for h, at in self._idle if now - at >= self.idle_s]
                self._idle = [(h, at) for h, at in self._idle if now - at < self.idle_s]
                old += self._stale
                self._stale = []
                for h in old:
                    self._taken_at.pop(h, None)
                wait = min((self.idle_s - (now - at) for _, at in self._idle), default=None)
            if old:
                try:
                    self.r.zrem(self.key, *old)
                except redis.RedisError as exc:  # they expire on their own
                    log.warning("oned slots: hand-back failed: %s", type(exc).__name__)
            if wait is not None and not old:
                time.sleep(max(0.001, wait))  # reaper period, not synchronisation

    def flush(self) -> None:
        """Hand back every kept slot now."""
        with self._cond:
            old = [h for h, _ in self._idle] + self._stale
            self._idle, self._stale = [], []
            for h in old:
                self._taken_at.pop(h, None)
        if old:
            self.r.zrem(self.key, *old)

    def holders(self) -> int:
        return int(self.r.zcard(self.key))

    def renew(self, holders: list[str]) -> None:
        """Push back the expiry of slots still held (those already reaped stay gone)."""
        self._renew(keys=[self.key], args=[self.ttl_ms, *holders])


class OnedGateway:
    """The calls the flows make, each capped, retried and counted. Thread-safe."""

    def __init__(self, client: OnedClient, semaphore: OnedSemaphore, settings: OnedSettings, secret: str = "",
                 observer: CallObserver | None = None) -> None:
        self.client = client
        self.semaphore = semaphore
        self.settings = settings
        self.secret = secret
        self.observer = observer
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._shared_ds: tuple[float, frozenset[int]] | None = None
        self.reader = VmReader(self.vm_pool_set)
        # One helper thread per slot this process can hold: a submit never queues behind a lingering call.
        self._runner = ThreadPoolExecutor(max_workers=semaphore.cap, thread_name_prefix="oneha-oned")
        self._lingering: dict[str, Future[Any]] = {}  # slot holder -> call past its wait, still unanswered
        self._unanswered: dict[int, Future[Any]] = {}  # VM id -> mutating call of ours oned has not answered
        # VM id -> a mutating call we closed unanswered after abandon_after_s (oned may still apply it), until
        # `abandoned` is asked; bounded: a VM's entry goes at the next question or when the dict grows past 10,000
        self._abandoned: dict[int, float] = {}
        self._renewer: threading.Thread | None = None

    @classmethod
    def connect(cls, settings: OnedSettings, session: str, client: redis.Redis, keys: Keys,
                observer: CallObserver | None = None) -> OnedGateway:
        # The transport waits up to abandon_after_s for an answer; callers stop waiting after the read timeout.
        server = make_server(settings.endpoint, session, settings.connect_timeout_s, settings.abandon_after_s,
                             settings.https_verify)
        ttl = settings.connect_timeout_s + settings.read_timeout_s + 5.0  # lingering calls renew theirs
        # A kept slot is reused only within 2 s of being taken: a call started then (at most connect + read
        # timeout long) still ends 3 s before the slot expires.
        sem = OnedSemaphore(client, keys.oned_semaphore, settings.max_concurrent_calls, ttl, reuse_s=2.0)
        return cls(OnedClient(server), sem, settings, session, observer)

    # The one place every call passes ---------------------------------------------------------------------------
    def call(self, method: str, fn: Callable[[], T], vm_id: int | None = None, mutating: bool = False) -> T:
        """Run `fn` under the cap with retries. `vm_id` marks a mutating call on that VM (see the module doc);
        `mutating` one on anything else (a host's status): an unanswered one is UNKNOWN, never re-sent."""
        attempts = self.settings.call_attempts
        mutating = mutating or vm_id is not None
        for attempt in range(attempts):
            if vm_id is not None and self._unanswered.get(vm_id) is not None:
                raise OnedError(method, ErrorKind.UNKNOWN, f"an earlier call on VM {vm_id} is still unanswered",
                                attempt)
            holder = self.semaphore.acquire(self.settings.read_timeout_s + self.settings.connect_timeout_s)
            started = time.monotonic()
            with self._lock:
                self.calls[method] += 1
            try:
                result = self._answer(method, fn, holder, vm_id)
            except Exception as exc:
                kind = classify_error(exc, mutating)
                if self.observer:
                    self.observer.oned_call(method, time.monotonic() - started, kind)
                message = self._clean(exc)
                if kind is not ErrorKind.TRANSIENT or attempt == attempts - 1:
                    raise OnedError(method, kind, message, attempt + 1, missing=is_no_exists(exc)) from None
                log.info("oned %s failed transiently (%s), attempt %d/%d", method, message, attempt + 1, attempts)
                if self.observer:
                    self.observer.oned_retry(method)
            else:
                if self.observer:
                    self.observer.oned_call(method, time.monotonic() - started, None)
                return result
            time.sleep(full_jitter(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s))
        raise AssertionError("unreachable")

    def _answer(self, method: str, fn: Callable[[], T], holder: str, vm_id: int | None) -> T:
        """Run `fn` on a helper thread; wait for it up to connect + read timeout. The slot goes back when the call
        ends, not when we stop waiting: past the wait, the call lingers (`_linger`) and `_NoAnswer` is raised."""
        lingers = False
        wait_s = self.settings.connect_timeout_s + self.settings.read_timeout_s
        try:
            future = self._runner.submit(fn)
            return future.result(timeout=wait_s)
        except FutureTimeout:
            lingers = True
            self._linger(method, future, holder, vm_id)  # from now on, the call's end releases the slot
            raise _NoAnswer(f"read timeout: no answer within {wait_s:g}s; the call stays open") from None
        finally:
            if not lingers:
                self.semaphore.release(holder)

    def _linger(self, method: str, future: Future[Any], holder: str, vm_id: int | None) -> None:
        with self._lock:
            self._lingering[holder] = future
            if vm_id is not None:
                self._unanswered[vm_id] = future
            self._ensure_renewer()

        def ended(done: Future[Any]) -> None:
            exc = done.exception()
            with self._lock:
                self._lingering.pop(holder, None)
                if vm_id is not None and self._unanswered.get(vm_id) is done:
                    del self._unanswered[vm_id]
                if vm_id is not None and exc is not None:
                    if len(self._abandoned) >= 10_000:
                        self._abandoned.pop(next(iter(self._abandoned)))
                    self._abandoned[vm_id] = time.monotonic()
            if exc is not None:
                log.warning("oned %s: no answer after %gs either (%s): connection closed; oned may still apply it",
                            method, self.settings.abandon_after_s, self._clean(exc))
            else:
                log.info("oned %s answered late; its slot is free again", method)
            self.semaphore.release(holder)

        future.add_done_callback(ended)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_lingering, name="oneha-oned-linger", daemon=True)
            self._renewer.start()

    def _renew_lingering(self) -> None:
        """Keep the Redis slots of lingering calls from expiring while oned still has the request."""
        period_s = max(0.2, self.semaphore.ttl_ms / 3000)
        while True:
            time.sleep(period_s)  # renewal period, not synchronisation
            with self._lock:
                holders = list(self._lingering)
            if holders:
                try:
                    self.semaphore.renew(holders)
                except redis.RedisError as exc:
                    log.warning("oned slots: renewal failed: %s", type(exc).__name__)

    def settle(self, vm_id: int, timeout_s: float | None = None) -> bool:
        """Wait until no call of ours on this VM is unanswered (answered, or its connection closed). True if so."""
        with self._lock:
            future = self._unanswered.get(vm_id)
        if future is None:
            return True
        wait_s = self.settings.abandon_after_s + self.settings.connect_timeout_s if timeout_s is None else timeout_s
        try:
            future.result(timeout=wait_s)
        except FutureTimeout:
            return False
        except Exception:  # noqa: S110 - the call's own failure was already reported; ended is what counts
            pass
        return True

    def abandoned(self, vm_id: int) -> bool:
        """True (once) if our last unanswered change on this VM ended without an answer: the connection was closed
        after abandon_after_s, and oned, which runs a call to its end, may still apply it at any time."""
        with self._lock:
            return self._abandoned.pop(vm_id, None) is not None

    def lingering(self) -> int:
        """Calls oned has not answered that still hold a slot."""
        with self._lock:
            return len(self._lingering)

    def _clean(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"[:300]
        if self.secret:
            text = text.replace(self.secret, "***")
            user_pass = self.secret.split(":", 1)
            if len(user_pass) == 2 and user_pass[1]:
                text = text.replace(user_pass[1], "***")
        return text

    # The calls -------------------------------------------------------------------------------------------------
    def host_info(self, host_id: int) -> HostView:
        return self.call("one.host.info", lambda: self.client.host_info(host_id))

    def host_pool(self) -> list[HostView]:
        return self.call("one.hostpool.info", self.client.host_pool)

    def vm_info(self, vm_id: int) -> VmView:
        return self.call("one.vm.info", lambda: self.client.vm_info(vm_id))

    def vm_pool_set(self, vm_ids: Iterable[int], extended: bool = False) -> list[VmView]:
        ids = sorted(set(vm_ids))
        out: list[VmView] = []
        size = self.settings.infoset_chunk_vms
        for i in range(0, len(ids), size):
            chunk = ids[i:i + size]
            out.extend(self.call("one.vmpool.infoset", functools.partial(self.client.vm_pool_set, chunk, extended)))
        return out

    def vm_action(self, action: str, vm_id: int) -> None:
        self.call("one.vm.action", lambda: self.client.vm_action(action, vm_id), vm_id=vm_id)

    def vm_recover(self, vm_id: int, op: RecoverOp) -> None:
        self.call("one.vm.recover", lambda: self.client.vm_recover(vm_id, op), vm_id=vm_id)

    def host_status(self, host_id: int, status: HostStatus) -> None:
        self.call("one.host.status", lambda: self.client.host_status(host_id, status), mutating=True)

    def vm_deploy(self, vm_id: int, host_id: int, enforce: bool = True, ds_id: int = -1) -> None:
        self.call("one.vm.deploy", lambda: self.client.vm_deploy(vm_id, host_id, enforce, ds_id), vm_id=vm_id)

    def shared_system_datastores(self, max_age_s: float = 30.0) -> frozenset[int]:
        cached = self._shared_ds
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        value = self.call("one.datastorepool.info", self.client.shared_system_datastores)
        self._shared_ds = (time.monotonic(), value)
        return value


class VmReader:
    """Coalesces concurrent VM reads of one process into `one.vmpool.infoset` calls.

    Callers queue the ids they need; one fetcher thread takes everything queued, makes one call (chunked at
    oned.infoset_chunk_vms), and hands each caller its VMs. Requests made while a call is in flight go into the
    next call, so batches grow with load and a lone request is served at once. The read starts after the request,
    so it is as fresh as a dedicated `one.vm.info`.
    """

    def __init__(self, fetch: Callable[[Iterable[int]], list[VmView]]) -> None:
        self.fetch = fetch
        self._cond = threading.Condition()
        self._queue: list[tuple[frozenset[int], Future[dict[int, VmView]]]] = []
        self._thread: threading.Thread | None = None
        self.batches = 0

    def get_many(self, vm_ids: Iterable[int], timeout_s: float = 120.0) -> dict[int, VmView]:
        """The VMs that exist among `vm_ids` (a VM missing from the answer no longer exists)."""
        fut: Future[dict[int, VmView]] = Future()
        with self._cond:
            self._queue.append((frozenset(vm_ids), fut))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="oneha-vm-reader", daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut.result(timeout=timeout_s)

    def get(self, vm_id: int, timeout_s: float = 120.0) -> VmView | None:
        return self.get_many([vm_id], timeout_s).get(vm_id)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            wanted = frozenset().union(*(ids for ids, _ in batch))
            try:
                views = {v.id: v for v in self.fetch(wanted)}
            except BaseException as exc:  # handed to every waiter; the thread keeps serving
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self.batches += 1
            for ids, fut in batch:
                fut.set_result({i: views[i] for i in ids if i in views})


class _NoAnswer(TimeoutError):
    """oned did not answer within the caller's wait; the call runs on (lingers) and keeps its slot."""


def describe(exc: BaseException) -> str:
    """A loggable one-liner for any exception a step may see (OnedError is already clean)."""
    if isinstance(exc, OnedError):
        return str(exc)
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OnedError) and exc.kind is ErrorKind.TRANSIENT


__all__ = ["CallObserver", "OnedError", "OnedGateway", "OnedSemaphore", "VmReader", "describe", "full_jitter",
           "is_transient"]
