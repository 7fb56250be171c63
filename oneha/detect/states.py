"""The detector's per-host states for the live view (contract point 7): one Redis hash, host id -> JSON
{"state": "ok|suspect|dead|isolated", "since": epoch, "proof": ..., "by": instance, "detail": ...}.

Every instance writes only what differs from the hash, so two instances agreeing write once; `since` moves only when
the state itself changes."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from oneha.keys import Keys

OK, SUSPECT, DEAD, ISOLATED = "ok", "suspect", "dead", "isolated"


class HostStates:
    def __init__(self, client: redis.Redis, keys: Keys, instance: str) -> None:
        self.r, self.keys, self.instance = client, keys, instance
        self.current: dict[int, dict[str, Any]] = {}

    def refresh(self) -> dict[int, dict[str, Any]]:
        raw = self.r.hgetall(self.keys.detect_states)
        self.current = {int(k): json.loads(v) for k, v in raw.items()}
        return self.current

    def state(self, hid: int) -> str:
        return str(self.current.get(hid, {}).get("state", OK))

    def set(self, hid: int, state: str, detail: str = "", proof: str = "") -> None:
        old = self.current.get(hid, {})
        if old.get("state", OK if not old else None) == state and old.get("detail", "") == detail:
            return
        since = old.get("since") if old.get("state") == state else round(time.time(), 3)
        entry = {"state": state, "since": since, "proof": proof, "by": self.instance, "detail": detail}
        self.r.hset(self.keys.detect_states, str(hid), json.dumps(entry, sort_keys=True))
        self.current[hid] = entry
