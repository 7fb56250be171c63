"""One detector instance decides a suspect host at a time: a lease in Redis with a token, renewed while it decides.
A detector killed mid-decision stops renewing; the lease expires and another instance decides again (every step of a
decision is safe to repeat: fencing an Off host reads Off again, a second report joins the same incident)."""

from __future__ import annotations

import secrets

import redis

from oneha.keys import Keys

# KEYS: lease. ARGV: token, ttl ms. Renew (or release with ttl 0) only if the lease is ours.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class DecisionLease:
    def __init__(self, client: redis.Redis, keys: Keys, host_id: int, instance: str, ttl_s: float) -> None:
        self.r = client
        self.key = keys.detect_decision(host_id)
        self.token = f"{instance}:{secrets.token_hex(4)}"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._renew = client.register_script(_RENEW)

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._renew(keys=[self.key], args=[self.token, 0])
