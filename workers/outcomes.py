"""The words the recovery core speaks: actions on a VM, the result of one mutating call, and VM results.

`StrEnum`s, so the values written to Redis, the audit log and metric labels are the same bytes as the bare strings
they replace (a member *is* its value as a `str`).
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a flow does to one VM. `NONE` and `REPORT` are decisions not to act (policy; nothing safe to do)."""

    MIGRATE = "migrate"
    RECREATE = "recreate"
    DELETE = "delete"
    RESUME = "resume"
    NONE = "none"
    REPORT = "report"


class CallOutcome(StrEnum):
    """What came of one mutating call (`vm_steps.act`)."""

    DONE = "done"
    DRY_RUN = "dry_run"  # not sent: a drill
    WRONG_STATE = "wrong_state"  # refused by oned in the VM's state: re-read and decide again
    GONE = "gone"  # the VM no longer exists
    UNKNOWN = "unknown"  # oned did not answer: the call may have been applied; re-read, never re-send blindly
    ABANDONED = "abandoned"  # no answer within oned.abandon_after_s, connection closed: oned may still apply it later


class Result(StrEnum):
    """How one VM ended, as recorded (`incident_vms`), audited and counted."""

    RECOVERED = "recovered"
    DRY_RUN = "dry_run"
    SKIPPED = "skipped"  # another incident recovers it
    GONE = "gone"
    NOT_RECOVERABLE = "not_recoverable"
    LEFT_ON_HOST = "left_on_host"
    FAILED = "failed"
    TIMEOUT = "timeout"
    NO_ACTION = "no_action"
    LOOP_PROTECTION = "loop_protection"
    NO_RECORD = "no_record"  # chosen by a host incident, but its record was lost with Redis


# A host incident's VM counts as handled (the incident RECOVERED) with one of these.
OK_RESULTS = frozenset({Result.RECOVERED, Result.DRY_RUN, Result.SKIPPED, Result.GONE})
