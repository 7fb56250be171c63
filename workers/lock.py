"""A Redis lease lock with renewal and a fencing token (REFERENCE §6: locks are for efficiency, tokens for safety).

`acquire` takes a new token (INCR `keys.fencing_token`) and sets the lock to it with SET NX PX (one Lua call). A
background thread renews the lease while the holder works; `check()` (called right before every mutating oned call)
verifies, in Redis, that the lock still holds *our* token and renews it at the same time; otherwise it raises
`LeaseLost`, so a worker that was paused or partitioned past its lease stops instead of acting next to the new
holder. `check_local()` is the free check for waits between actions: it trusts the last renewal Redis confirmed
for at most one lease (measured from before that request was sent).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from oneha.keys import Keys, Resource

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Our token no longer holds the lock: someone else may be acting; stop."""


# KEYS: lock. ARGV: token, ttl ms. Renew only if the lock is ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock, token counter. ARGV: ttl ms. A new token; the lock set to it if free. Returns {token, 1|0}.
_ACQUIRE = """
local token = redis.call('INCR', KEYS[2])
if redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[1]) then return {token, 1} end
return {token, 0}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One holder's lease on a host or VM. Use as a context manager (renewal thread, release on exit)."""

    def __init__(self, client: redis.Redis, keys: Keys, resource: Resource, resource_id: int, ttl_s: float,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000) -> None:
        self.r = client
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.key = keys.lock(resource, resource_id)
        self.token_key = keys.fencing_token(resource, resource_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token: str | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = 0.0
        self._valid_until = 0.0  # monotonic: the lock is surely ours until then (last confirmed renewal + ttl)

    def acquire(self, pipe: redis.client.Pipeline | None = None) -> bool:
        """Take a new fencing token and the lock with it (one round trip). With `pipe`, only queue the call and
        let `acquired(reply)` read its result after the pipeline ran."""
        sent = time.monotonic()
        if pipe is not None:
            self._acquire(keys=[self.key, self.token_key], args=[self.ttl_ms], client=pipe)
            self._sent = sent
            return True
        return self.acquired(self._acquire(keys=[self.key, self.token_key], args=[self.ttl_ms]), sent)

    def acquired(self, reply: list[object], sent: float | None = None) -> bool:
        token, ok = reply
        if not int(ok):  # type: ignore[call-overload]
            return False
        self.token = str(token)
        self._valid_until = (sent if sent is not None else self._sent) + self.ttl_ms / 1000.0
        if not self._replicated(self.token):
            self.release()
            return False
        return True

    def _replicated(self, token: str) -> bool:
        """With replicas configured: WAIT until they hold the lock and the token counter, before anything is done
        under it. Replication is asynchronous; a lock only the dying master knew would vanish in a failover, and
        the promoted replica could give the same token to a second holder. Not acknowledged: not acquired."""
        if self.wait_replicas <= 0:
            return True
        # WAIT counts the writes of the connection it is sent on, and a pool may lend another one: renew the lock
        # (a write, after the acquisition in the master's replication stream) and WAIT on one connection.
        pipe = self.r.pipeline(transaction=False)
        self._renew(keys=[self.key], args=[token, self.ttl_ms], client=pipe)
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        try:
            renewed, acked = pipe.execute()
        except redis.RedisError as exc:
            log.warning("%s: WAIT failed (%s): lock given back", self.key, type(exc).__name__)
            return False
        if not int(renewed):
            return False
        if int(acked) < self.wait_replicas:
            log.warning("%s: %d of %d replicas acknowledged the lock in %d ms: lock given back", self.key, acked,
                        self.wait_replicas, self.wait_timeout_ms)
            return False
        return True

    def check(self) -> None:
        """Raise LeaseLost unless our token still holds the lock; renew it on the way (one round trip)."""
        sent = time.monotonic()
        if self.token is None or not self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            self._valid_until = 0.0
            raise LeaseLost(f"{self.key}: lease lost (token {self.token})")
        self._valid_until = sent + self.ttl_ms / 1000.0

    def check_local(self, margin_s: float = 0.0) -> None:
        """Raise LeaseLost unless a renewal confirmed in Redis less than a lease ago still covers now (+ margin).

        No round trip: for waits and reads between actions. Before a mutating call use `check()`, which asks Redis.
        """
        if self.token is None or time.monotonic() + margin_s >= self._valid_until:
            raise LeaseLost(f"{self.key}: lease not renewed within its ttl (token {self.token})")

    def held(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True

    def start_renewal(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"renew {self.key}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                if not self.held():
                    log.warning("%s: lease lost, renewal stops", self.key)
                    return
            except redis.RedisError as exc:  # next round retries; check() before acting decides
                log.warning("%s: renewal failed: %s", self.key, type(exc).__name__)

    def release(self, pipe: redis.client.Pipeline | None = None) -> None:
        """Stop renewing and free the lock (queued on `pipe` if given: the caller executes it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self.token is not None:
            if pipe is not None:
                self._release(keys=[self.key], args=[self.token], client=pipe)
            else:
                with contextlib.suppress(redis.RedisError):  # else the lease expires on its own
                    self._release(keys=[self.key], args=[self.token])
        self.token = None
        self._valid_until = 0.0

    def __enter__(self) -> Lease:
        self.start_renewal()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
