"""Incidents: one per failure, however many times and ways it is reported; kept and changed atomically in Redis.

An incident is open from the first report until a worker (or a cancellation) closes it. While open, the key
`open:<resource>:<id>` points at it, so every further report (repeats, both key forms, other subscribers, the bridge,
the reconciler) only bumps its `reports` counter. Closing it leaves a `handled` marker, so a host that stays in ERROR
after its VMs were recovered does not open a new incident on every reconcile tick; the marker goes when the host is
seen healthy again (or, for a VM, when it has been deployed again: its history sequence changed).

The `due` sorted set says when an open incident next needs a worker: at the end of its grace period, when a held
incident should re-check, or when the lease of the worker handling it runs out (a dead worker's incident is simply
dispatched again; the flows are idempotent).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import redis

from oneha.keys import Keys, Resource

if TYPE_CHECKING:
    from redis.client import Pipeline

# The store's client decodes (checked in IncidentStore): its hashes are str to str.
Strs = dict[str, str]

ID = "{id}"  # stands for the incident id in a key template (Keys.incident(ID)) that a Lua script fills in


class Kind(StrEnum):
    HOST = "host"
    VM_FAILURE = "vm_failure"
    VM_CRASH = "vm_crash"

    @property
    def resource(self) -> Resource:
        return "host" if self is Kind.HOST else "vm"


class Status(StrEnum):
    WAITING = "waiting"  # grace period running
    QUEUED = "queued"  # handed to the workers
    RUNNING = "running"
    HELD = "held"  # storm guard: waits for approval or for the condition to clear
    FENCE_FAILED = "fence_failed"  # fail closed: nothing recovered, an operator must look
    RECOVERING = "recovering"  # VM tasks of a host incident under way
    RECOVERED = "recovered"
    PARTIAL = "partial"  # some VMs could not be recovered
    FAILED = "failed"
    CANCELLED = "cancelled"  # the host came back within its grace period
    NO_ACTION = "no_action"  # nothing to do (came back, disabled by an operator, owned by a host incident...)

    @property
    def is_open(self) -> bool:
        return self not in CLOSED_STATUSES


CLOSED_STATUSES = frozenset({Status.RECOVERED, Status.PARTIAL, Status.FAILED, Status.CANCELLED, Status.NO_ACTION})
_CLOSED_VALUES = frozenset(s.value for s in CLOSED_STATUSES)
# What a worker sets while it handles an incident. A worker may find an incident in any open status: a re-dispatch
# after a lease ran out, a held incident re-checked, a failed fence approved.
_WORKING = frozenset({Status.RUNNING, Status.HELD, Status.FENCE_FAILED, Status.RECOVERING})
# Every status change, declared: status -> the statuses it may become. Closed is final. Checked in Redis, atomically,
# by every change the store makes (`_TRANSITION`, `_CLOSE`; `_CANCEL_WAITING` is WAITING -> CANCELLED only).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.WAITING: frozenset({Status.QUEUED}) | _WORKING | CLOSED_STATUSES,
    Status.QUEUED: _WORKING | CLOSED_STATUSES,
    **{s: _WORKING | CLOSED_STATUSES for s in _WORKING},
    **{s: frozenset() for s in CLOSED_STATUSES},
}


def is_closed(status: str) -> bool:
    """A status as read from Redis (a bare string) is closed."""
    return status in _CLOSED_VALUES


def allowed_from(status: Status) -> list[Status]:
    """The statuses an incident may be in to become `status` (TRANSITIONS read backwards)."""
    return sorted(s for s, targets in TRANSITIONS.items() if status in targets)


@dataclass
class Incident:
    id: int
    kind: Kind
    resource_id: int
    cluster_id: int
    status: Status
    source: str
    opened_at: float
    due_at: float
    updated_at: float
    closed_at: float | None = None
    reports: int = 1
    approved: bool = False
    detail: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Incident:
        known = {"id", "kind", "resource_id", "cluster_id", "status", "source", "opened_at", "due_at",
                 "updated_at", "closed_at", "reports", "approved", "detail"}
        return cls(
            id=int(data["id"]),
            kind=Kind(data["kind"]),
            resource_id=int(data["resource_id"]),
            cluster_id=int(data.get("cluster_id", -1)),
            status=Status(data["status"]),
            source=data.get("source", ""),
            opened_at=float(data["opened_at"]),
            due_at=float(data.get("due_at", 0)),
            updated_at=float(data.get("updated_at", 0)),
            closed_at=float(data["closed_at"]) if data.get("closed_at") else None,
            reports=int(data.get("reports", 1)),
            approved=data.get("approved") == "1",
            detail=data.get("detail", ""),
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class ReportRequest:
    """One failure to report (the arguments of IncidentStore.report), for report_many."""

    kind: Kind
    resource_id: int
    cluster_id: int
    grace_s: float
    source: str
    token: str = ""
    owner_host: int | None = None  # a crashed VM's host: while that host has an open incident, the host owns it


@dataclass(frozen=True)
class Report:
    """The outcome of reporting a failure."""

    incident_id: int
    opened: bool  # False: it collapsed into an existing incident or a handled failure
    reason: str = ""  # why not opened: "open", "handled", or "owned" (the VM's host has an open incident)


# One report, shared by _REPORT and _REPORT_MANY: returns id, opened (1/0), why not opened ('open', 'handled',
# 'owned', ''). Arguments: open key, handled hash, seq, due zset, index zset; incident key template (Keys.incident
# of ID: the id is handed out here), kind, resource id, cluster id,
# now, due, source, handled-token (VM history seq or ""), owner key (open key of a crashed VM's host, or "").
# All strings, as the callers pass them. A VM that went UNKNOWN because its host failed is the host incident's:
# opening a crash incident for each would only add oned calls (and noise) while the host is being recovered.
_REPORT_FN = """
local function key_of(template, id) return (string.gsub(template, '{id}', id)) end
local function report(open_key, handled_key, seq_key, due_key, index_key, incident_key, kind, rid, cluster, now, due,
                      source, token, owner_key)
  local existing = redis.call('GET', open_key)
  if existing then
    redis.call('HINCRBY', key_of(incident_key, existing), 'reports', 1)
    return tonumber(existing), 0, 'open'
  end
  if owner_key ~= '' then
    local owner = redis.call('GET', owner_key)
    if owner then return tonumber(owner), 0, 'owned' end
  end
  local handled = redis.call('HGET', handled_key, rid)
  if handled then
    local sep = string.find(handled, ':', 1, true)
    local htoken = sep and string.sub(handled, sep + 1) or ''
    if htoken == token then
      local hid = sep and string.sub(handled, 1, sep - 1) or handled
      return tonumber(hid), 0, 'handled'
    end
    redis.call('HDEL', handled_key, rid)
  end
  if redis.call('EXISTS', seq_key) == 0 then
    -- A new (or emptied) Redis: ids go on from milliseconds since 2025-01-01 (Redis time), not from 1, so they
    -- never repeat ids handed out before an empty restart (unless more than 1000 were opened per second).
    local t = redis.call('TIME')
    redis.call('SET', seq_key, (tonumber(t[1]) - 1735689600) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  local id = redis.call('INCR', seq_key)
  local key = key_of(incident_key, id)
  redis.call('SET', open_key, id)
  redis.call('HSET', key, 'id', id, 'kind', kind, 'resource_id', rid, 'cluster_id', cluster,
    'status', 'waiting', 'source', source, 'opened_at', now, 'due_at', due, 'updated_at', now,
    'reports', 1, 'approved', 0, 'detail', '', 'token', token)
  redis.call('ZADD', due_key, due, id)
  redis.call('ZADD', index_key, now, id)
  return id, 1, ''
end
"""

# KEYS: open key, handled hash, seq, due zset, index zset.
# ARGV: incident key template, kind, resource id, cluster id, now, due, source, handled-token, owner key.
_REPORT = _REPORT_FN + """
local id, opened, reason = report(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                                  ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return {id, opened, reason}
"""

# A detector proved a host dead (contract point 4): open the host incident, or join the open one, exactly as _REPORT
# (a handled failure stays handled), and on an open incident set the proof fields and make it due now, in one step.
# KEYS: open key, handled hash, seq, due zset, index zset. ARGV: incident key template, resource id, cluster id, now,
# source, then field, value pairs (proof, proven_dead_at, fenced_at, fence, proof_detail). Returns {id, opened, reason}.
_PROVEN_DEAD = _REPORT_FN + """
local id, opened, reason = report(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], 'host', ARGV[2], ARGV[3],
                                  ARGV[4], ARGV[4], ARGV[5], '', '')
if reason ~= 'handled' then
  local key = key_of(ARGV[1], id)
  redis.call('HSET', key, 'due_at', ARGV[4], 'updated_at', ARGV[4], unpack(ARGV, 6))
  redis.call('ZADD', KEYS[4], ARGV[4], id)
end
return {id, opened, reason}
"""

# Many reports in one call, each exactly as _REPORT, in order; the audit entry of every incident opened is written
# here too (ARGV[4]: the template of Keys.incident_log). One command instead of a pipeline of scripts plus a
# pipeline of audit writes: redis-py spends far more time packing and parsing commands than Redis spends running them.
# KEYS: seq, due zset, index zset. ARGV: incident key template, audit entries kept, JSON list of
# [open key, handled hash, kind, resource id, cluster id, now, due, source, token, audit entry, owner key]
# (all strings), audit log key template.
# Returns JSON: [id, opened, reason, id, opened, reason, ...].
_REPORT_MANY = _REPORT_FN + """
local keep = tonumber(ARGV[2])
local out = {}
for _, q in ipairs(cjson.decode(ARGV[3])) do
  local id, opened, reason = report(q[1], q[2], KEYS[1], KEYS[2], KEYS[3], ARGV[1], q[3], q[4], q[5], q[6], q[7],
                                    q[8], q[9], q[11])
  if opened == 1 then
    local log = key_of(ARGV[4], id)
    redis.call('RPUSH', log, q[10])
    redis.call('LTRIM', log, -keep, -1)
  end
  out[#out + 1] = id
  out[#out + 1] = opened
  out[#out + 1] = reason
end
return cjson.encode(out)
"""
REPORT_CHUNK = 500  # reports per _REPORT_MANY call: bounds how long one call keeps Redis busy (about a millisecond)

# KEYS: open key, due zset. ARGV: incident key template, now, detail. Cancels only an incident still in its grace
# period (TRANSITIONS: WAITING -> CANCELLED), and never one a detector proved (`proof`): oned may still show such a
# host MONITORED (its monitoring has not noticed yet), which is no sign that it came back.
_CANCEL_WAITING = """
local id = redis.call('GET', KEYS[1])
if not id then return nil end
local key = string.gsub(ARGV[1], '{id}', id)
if redis.call('HGET', key, 'status') ~= 'waiting' then return nil end
if redis.call('HEXISTS', key, 'proof') == 1 then return nil end
redis.call('HSET', key, 'status', 'cancelled', 'closed_at', ARGV[2], 'updated_at', ARGV[2], 'detail', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
return tonumber(id)
"""

# KEYS: due zset. ARGV: now, lease end, limit. Claims due incidents by pushing their due time to the lease end,
# so that concurrent dispatchers never hand out the same incident twice within one lease.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

# KEYS: open key, due zset, handled hash, incident hash. ARGV: id, status, now, detail, resource id, handled value,
# the statuses it may be closed from (TRANSITIONS). An incident already closed stays as the first close left it
# (returns 0). A hash lost with Redis is closed all the same: its open key and due entry must not outlive it.
_CLOSE = """
local status = redis.call('HGET', KEYS[4], 'status')
if status and not string.find(' ' .. ARGV[7] .. ' ', ' ' .. status .. ' ', 1, true) then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[4], 'status', ARGV[2], 'closed_at', ARGV[3], 'updated_at', ARGV[3], 'detail', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[6]) end
return 1
"""

# KEYS: incident hash. ARGV: new status, now, the statuses it may be changed from (space-separated, from
# TRANSITIONS), then field, value pairs to set with it. Returns {status before, 1 if changed else 0}, or nil if
# there is no such incident (nothing is written: a lost or expired incident is not brought back half-empty).
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if not string.find(' ' .. ARGV[3] .. ' ', ' ' .. status .. ' ', 1, true) then return {status, 0} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2], unpack(ARGV, 4))
return {status, 1}
"""

# KEYS: pending set of a host incident. ARGV: vm id. Takes the VM off; 1 if it was the last one (the caller
# closes the incident), else 0.
_FINISH_VM = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if removed == 1 and redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"""


class IncidentStore:
    """All reads and writes of incidents. Thread-safe (redis-py clients are)."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None, retention_s: int = 14 * 86400,
                 max_incidents: int = 10_000, log_entries: int = 500) -> None:
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("IncidentStore needs a client with decode_responses=True (oneha.redisconn.client)")
        self.r = client
        self.keys = keys or Keys()
        self.retention_s = retention_s
        self.max_incidents = max_incidents
        self.log_entries = log_entries
        self._report = client.register_script(_REPORT)
        self._report_many = client.register_script(_REPORT_MANY)
        self._proven_dead = client.register_script(_PROVEN_DEAD)
        self._cancel = client.register_script(_CANCEL_WAITING)
        self._claim = client.register_script(_CLAIM_DUE)
        self._close = client.register_script(_CLOSE)
        self._transition = client.register_script(_TRANSITION)

    # Intake ----------------------------------------------------------------------------------------------------
    def report(self, kind: Kind, resource_id: int, cluster_id: int, grace_s: float, source: str,
               token: str = "", now: float | None = None, owner_host: int | None = None) -> Report:
        """Open an incident for a failure, or collapse the report into the one already open/handled/owned.

        `token` tells failure episodes of one VM apart (its history sequence): a handled marker with another
        token is stale and no longer suppresses. `owner_host`: a crashed VM's host; while that host has an open
        incident, no crash incident is opened (reason "owned").
        """
        now = time.time() if now is None else now
        k = self.keys
        res = kind.resource
        raw = self._report(
            keys=[k.open_incident(res, resource_id), k.handled(res), k.incident_seq, k.due, k.incident_index],
            args=[k.incident(ID), kind.value, resource_id, cluster_id, now, now + grace_s, source, token,
                  self._owner_key(owner_host)],
        )
        incident_id, opened, reason = int(raw[0]), bool(int(raw[1])), str(raw[2])
        if opened:
            self.audit(incident_id, "opened", source=source, grace_s=grace_s)
        return Report(incident_id, opened, reason)

    def report_proven_dead(self, host_id: int, cluster_id: int, source: str, proof: str, fenced: bool,
                           detail: str = "", now: float | None = None) -> Report:
        """A detector proved host `host_id` dead (proof "bmc" or "heartbeat"): open its host incident, or join the
        open one (oned's ERROR event, arriving later, joins it too), set `proof`, `proven_dead_at`, `fenced_at`
        (when `fenced`: power read back Off, or self-fenced by its watchdog by then) and `fence`, and make it due
        now; one Lua script. Safe to repeat. A failure already handled (closed, host not seen healthy since) stays
        handled: reason "handled", nothing written."""
        if proof not in ("bmc", "heartbeat"):
            raise ValueError(f"unknown proof {proof!r}")
        now = time.time() if now is None else now
        k = self.keys
        fields: list[str | float] = ["proof", proof, "proven_dead_at", now, "fence", f"detector:{proof}",
                                     "proof_detail", detail]
        if fenced:
            fields += ["fenced_at", now]
        raw = self._proven_dead(
            keys=[k.open_incident("host", host_id), k.handled("host"), k.incident_seq, k.due, k.incident_index],
            args=[k.incident(ID), host_id, cluster_id, now, source, *fields])
        report = Report(int(raw[0]), bool(int(raw[1])), str(raw[2]))
        if report.opened:
            self.audit(report.incident_id, "opened", source=source, grace_s=0)
        if report.reason != "handled":
            self.audit(report.incident_id, "proven_dead", source=source, proof=proof, detail=detail)
        return report

    def _owner_key(self, owner_host: int | None) -> str:
        return self.keys.open_incident("host", owner_host) if owner_host is not None else ""

    def report_many(self, requests: Sequence[ReportRequest], now: float | None = None) -> list[Report]:
        """report() for many failures, in order, in one round trip per REPORT_CHUNK (each report stays atomic).

        The subscriber's hot path: a burst of events costs one Redis command instead of one (or three) per event.
        """
        if not requests:
            return []
        now = time.time() if now is None else now
        k = self.keys
        t = round(now, 3)
        entries: dict[tuple[float, str], str] = {}  # one audit entry per (grace, source) of the batch
        rows: list[list[str]] = []
        for q in requests:
            res = q.kind.resource
            entry = entries.get((q.grace_s, q.source))
            if entry is None:
                entry = entries[(q.grace_s, q.source)] = json.dumps(
                    {"t": t, "event": "opened", "grace_s": q.grace_s, "source": q.source}, sort_keys=True)
            rows.append([k.open_incident(res, q.resource_id), k.handled(res), q.kind.value, str(q.resource_id),
                         str(q.cluster_id), str(now), str(now + q.grace_s), q.source, q.token, entry,
                         self._owner_key(q.owner_host)])
        out: list[Report] = []
        for start in range(0, len(rows), REPORT_CHUNK):
            raw = json.loads(self._report_many(
                keys=[k.incident_seq, k.due, k.incident_index],
                args=[k.incident(ID), self.log_entries, json.dumps(rows[start:start + REPORT_CHUNK]),
                      k.incident_log(ID)]))
            out.extend(Report(int(raw[i]), bool(raw[i + 1]), raw[i + 2]) for i in range(0, len(raw), 3))
        return out

    def cancel_waiting(self, resource: Resource, resource_id: int, detail: str) -> int | None:
        """Cancel the open incident of a resource if it is still in its grace period; its id, or None."""
        now = time.time()
        raw = self._cancel(keys=[self.keys.open_incident(resource, resource_id), self.keys.due],
                           args=[self.keys.incident(ID), now, detail])
        if raw is None:
            return None
        self.audit(int(raw), "cancelled", detail=detail)
        self._expire(int(raw))
        return int(raw)

    def clear_handled(self, resource: Resource, resource_ids: list[int]) -> int:
        """Forget handled markers of resources seen healthy again: a new failure opens a new incident."""
        if not resource_ids:
            return 0
        return int(self.r.hdel(self.keys.handled(resource), *[str(i) for i in resource_ids]))

    def handled_ids(self, resource: Resource) -> dict[int, str]:
        return {int(k): v for k, v in cast(Strs, self.r.hgetall(self.keys.handled(resource))).items()}

    def has_open_or_handled(self, resource: Resource, resource_id: int) -> bool:
        """An open incident or a handled marker: what a "back to healthy" report would change."""
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.keys.open_incident(resource, resource_id))
        pipe.hexists(self.keys.handled(resource), str(resource_id))
        return any(pipe.execute())

    def open_incident_ids(self, resource: Resource, resource_ids: Sequence[int]) -> list[int | None]:
        """For each resource, the id of its open incident (None: none), in one MGET."""
        if not resource_ids:
            return []
        raw = self.r.mget([self.keys.open_incident(resource, i) for i in resource_ids])
        return [int(v) if v is not None else None for v in raw]

    def open_incident_id(self, resource: Resource, resource_id: int) -> int | None:
        raw = self.r.get(self.keys.open_incident(resource, resource_id))
        return int(raw) if raw is not None else None

    # Dispatch --------------------------------------------------------------------------------------------------
    def claim_due(self, lease_s: float, limit: int = 500, now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        raw = self._claim(keys=[self.keys.due], args=[now, now + lease_s, limit])
        return [int(i) for i in raw]

    def schedule(self, incident_id: int, at: float) -> None:
        """Next time a worker must look at this incident (only if it is still open: XX)."""
        self.r.zadd(self.keys.due, {str(incident_id): at}, xx=True)
        self.r.hset(self.keys.incident(incident_id), "due_at", at)

    def unschedule(self, incident_id: int) -> None:
        self.r.zrem(self.keys.due, str(incident_id))

    def approve(self, incident_id: int) -> Incident:
        inc = self.get(incident_id)
        if inc is None:
            raise KeyError(incident_id)
        if not inc.status.is_open:
            raise ValueError(f"incident {incident_id} is closed ({inc.status})")
        self.r.hset(self.keys.incident(incident_id), mapping={"approved": 1, "updated_at": time.time()})
        self.r.zadd(self.keys.due, {str(incident_id): time.time()})
        self.audit(incident_id, "approved")
        return self.get(incident_id) or inc

    # Pause (maintenance) ------------------------------------------------------------------------------------
    def pause(self, reason: str) -> None:
        """Stop all recovery actions (fencing included) until `resume`; incidents still open and wait."""
        self.r.set(self.keys.paused, json.dumps({"at": round(time.time(), 3), "reason": reason}))

    def paused(self) -> dict[str, Any] | None:
        raw = self.r.get(self.keys.paused)
        return json.loads(raw) if raw else None

    def resume(self) -> list[int]:
        """Lift the pause; incidents held or interrupted by it are due at once (those in their grace period keep
        their due time; a failed fence still needs `approve`). Returns their ids."""
        self.r.delete(self.keys.paused)
        now = time.time()
        ready = [inc.id for inc in self.open_incidents() if inc.status not in (Status.WAITING, Status.FENCE_FAILED)]
        for incident_id in ready:
            self.schedule(incident_id, now)
        return ready

    # Worker updates ------------------------------------------------------------------------------------------
    def set_status(self, incident_id: int, status: Status, detail: str = "", **fields: Any) -> bool:
        """Change the status (with `fields`) if TRANSITIONS allows it from the one in Redis; False if not (audited:
        a late worker must not reopen an incident closed meanwhile)."""
        if detail:
            fields["detail"] = detail
        before, changed = self._change(incident_id, status, **fields)
        if changed:
            self.audit(incident_id, f"status:{status.value}", detail=detail)
        elif before is not None:
            self.audit(incident_id, "status_refused", status=status.value, was=before, detail=detail)
        return changed

    def mark_queued(self, incident_id: int) -> str | None:
        """WAITING -> QUEUED (the dispatcher, before it sends the task); the status it had (None: no incident)."""
        return self._change(incident_id, Status.QUEUED)[0]

    def _change(self, incident_id: int, status: Status, **fields: Any) -> tuple[str | None, bool]:
        """The one writer of `status` but for report/cancel/close: (status before, changed), checked in Redis
        against TRANSITIONS."""
        sources = " ".join(s.value for s in allowed_from(status))
        pairs = [x for kv in fields.items() for x in kv]
        raw = self._transition(keys=[self.keys.incident(incident_id)],
                               args=[status.value, time.time(), sources, *pairs])
        if raw is None:
            return None, False
        return str(raw[0]), bool(int(raw[1]))

    def set_fields(self, incident_id: int, **fields: Any) -> None:
        mapping: dict[Any, Any] = {**fields, "updated_at": time.time()}
        self.r.hset(self.keys.incident(incident_id), mapping=mapping)

    def close(self, incident: Incident, status: Status, detail: str = "", handled: bool = True,
              handled_token: str = "") -> bool:
        """Close an incident. `handled` leaves the marker that suppresses repeats of this same failure. False (and
        audited) if it was closed already: the first close stands."""
        assert not status.is_open
        k = self.keys
        res = incident.kind.resource
        marker = f"{incident.id}:{handled_token}" if handled else ""
        sources = " ".join(s.value for s in allowed_from(status))
        closed = self._close(
            keys=[k.open_incident(res, incident.resource_id), k.due, k.handled(res), k.incident(incident.id)],
            args=[incident.id, status.value, time.time(), detail, incident.resource_id, marker, sources],
        )
        if not int(closed):
            self.audit(incident.id, "close_refused", status=status.value, detail=detail)
            return False
        self.audit(incident.id, f"closed:{status.value}", detail=detail)
        self._expire(incident.id)
        return True

    def record_vm(self, incident_id: int, vm_id: int, record: dict[str, Any],
                  pipe: Pipeline | None = None) -> None:
        (pipe if pipe is not None else self.r).hset(
            self.keys.incident_vms(incident_id), str(vm_id), json.dumps(record, sort_keys=True))

    # VM tasks of a host incident -------------------------------------------------------------------------------
    def add_pending_vms(self, incident_id: int, vm_ids: Sequence[int]) -> None:
        """VMs whose recovery task has yet to finish (the host incident closes when the set empties)."""
        if vm_ids:
            self.r.sadd(self.keys.incident_pending_vms(incident_id), *vm_ids)

    def pending_vms(self, incident_id: int) -> set[int]:
        return {int(v) for v in self.r.smembers(self.keys.incident_pending_vms(incident_id))}

    def get_if_vm_pending(self, incident_id: int, vm_id: int) -> tuple[Incident | None, bool]:
        """One round trip: the incident, and whether this VM is still pending."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.incident(incident_id))
        pipe.sismember(self.keys.incident_pending_vms(incident_id), str(vm_id))
        raw, pending = pipe.execute()
        found = Incident.from_hash(raw) if raw else None
        return found, bool(pending)

    def mark_vm_started(self, incident_id: int, vm_id: int, pipe: Pipeline) -> None:
        """Queued on `pipe`: the VM's task has started at least once (a re-run then knows it is not still queued)."""
        pipe.sadd(self.keys.incident_started_vms(incident_id), str(vm_id))

    def started_vms(self, incident_id: int, vm_ids: Sequence[int]) -> list[bool]:
        """For each VM: has its task started at least once."""
        if not vm_ids:
            return []
        raw = self.r.smismember(self.keys.incident_started_vms(incident_id), [str(v) for v in vm_ids])
        return [bool(x) for x in raw]

    def finish_vm(self, incident_id: int, vm_id: int, record: dict[str, Any], pipe: Pipeline | None = None) -> bool:
        """Record the VM and take it off the pending set, in one round trip with whatever `pipe` already holds.
        True if it was the last pending VM: the caller closes the incident."""
        pipe = pipe if pipe is not None else self.r.pipeline(transaction=False)
        self.record_vm(incident_id, vm_id, record, pipe)
        # EVAL, not a registered script: on a pipeline redis-py would first ask SCRIPT EXISTS (one more round trip).
        pipe.eval(_FINISH_VM, 1, self.keys.incident_pending_vms(incident_id), str(vm_id))
        return int(pipe.execute()[-1]) == 1

    def vm_records(self, incident_id: int) -> dict[int, dict[str, Any]]:
        raw = self.r.hgetall(self.keys.incident_vms(incident_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def audit(self, incident_id: int, event: str, **fields: Any) -> None:
        pipe = self.r.pipeline(transaction=False)
        self.audit_on(pipe, incident_id, event, **fields)
        pipe.execute()

    def audit_on(self, pipe: Pipeline, incident_id: int, event: str, **fields: Any) -> None:
        """Queue an audit entry on `pipe` (the caller executes it, with whatever else it holds)."""
        entry = json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str, sort_keys=True)
        key = self.keys.incident_log(incident_id)
        pipe.rpush(key, entry)
        pipe.ltrim(key, -self.log_entries, -1)

    def log(self, incident_id: int) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.r.lrange(self.keys.incident_log(incident_id), 0, -1)]

    # Reading ---------------------------------------------------------------------------------------------------
    def get(self, incident_id: int) -> Incident | None:
        raw = self.r.hgetall(self.keys.incident(incident_id))
        if not raw:
            return None
        return Incident.from_hash(cast(Strs, raw))

    def recent(self, limit: int = 50) -> list[Incident]:
        ids = cast(list[str], self.r.zrevrange(self.keys.incident_index, 0, limit - 1))
        found = (self.get(int(i)) for i in ids)
        return [inc for inc in found if inc is not None]

    def open_incidents(self) -> list[Incident]:
        return [inc for inc in self.recent(self.max_incidents) if inc.status.is_open]

    def open_counts(self) -> Counter[tuple[str, str]]:
        """Open incidents by (kind, status) (the gauges): the index, then one pipelined HMGET per incident."""
        ids = cast(list[str], self.r.zrevrange(self.keys.incident_index, 0, self.max_incidents - 1))
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(self.keys.incident(i), "kind", "status")
        counts: Counter[tuple[str, str]] = Counter()
        for kind, status in pipe.execute() if ids else []:
            if kind is not None and status is not None and not is_closed(status):
                counts[(kind, status)] += 1
        return counts

    # Retention -------------------------------------------------------------------------------------------------
    def _expire(self, incident_id: int) -> None:
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        for key in (k.incident(incident_id), k.incident_vms(incident_id), k.incident_log(incident_id),
                    k.incident_pending_vms(incident_id), k.incident_started_vms(incident_id)):
            pipe.expire(key, self.retention_s)
        pipe.zremrangebyscore(k.incident_index, "-inf", time.time() - self.retention_s)
        pipe.zremrangebyrank(k.incident_index, 0, -self.max_incidents - 1)
        pipe.execute()


def as_dict(incident: Incident) -> dict[str, Any]:
    data = asdict(incident)
    data["kind"] = incident.kind.value
    data["status"] = incident.status.value
    return data
