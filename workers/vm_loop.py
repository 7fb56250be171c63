"""The one VM-recovery loop: read -> decide -> act -> confirm -> retry.

Every flow that acts on a VM runs it: the host flow's VM task (`vm_task`), the VM failure and VM crash flows
(`vm_flows`). What differs between them is a `VmLoopKind`: how the VM is read, the decision (a plain function of
the VM as read and the loop's state), what "settled" means after a call, and what to note around a call. Written
once, here and in the steps it calls: the gate before a call (lease token, pause, dry run: `vm_steps.act`), a call
whose outcome is unknown (`act` waits for it to end and the next read decides; never re-sent blindly), an accepted
call that changed nothing (`vm_steps.confirm` ends the wait early; the loop decides again), and the bookkeeping
(attempts, when we acted, the detail said in the record).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from oneha.opennebula import FAILURE_LCM_STATES, VmState, VmView
from oneha.workers.outcomes import Action, CallOutcome, Result
from oneha.workers.runtime import Flow
from oneha.workers.vm_steps import act, confirm, unchanged

Verdict = Callable[[VmView], "bool | None"]  # True: done; False: failed; None: not yet


@dataclass
class Decision:
    """What the per-kind decision says about the VM as read: stop with a result, make a call, or only wait."""

    stop: Result | None = None
    action: Action = Action.NONE  # with `stop`: the action recorded; without: the call to make (NONE: wait)
    why: str = ""  # with `stop`: the record's detail; with a call: why this call


def stop(result: Result, action: Action, why: str) -> Decision:
    return Decision(result, action, why)


def call(action: Action, why: str) -> Decision:
    return Decision(None, action, why)


ABANDONED_DETAIL = ("oned never answered the call (connection closed after oned.abandon_after_s); oned may still "
                    "apply it, so it is not sent again: check the VM and act by hand")
WAIT = Decision()  # oned is moving the VM already (or nothing is ours to do yet): wait for it to settle


@dataclass
class LoopState:
    """What the loop knows between rounds; the decisions read it, the loop alone writes it."""

    attempts: int = 0
    action: Action = Action.NONE  # the last call decided
    acted_at: float | None = None
    detail: str = ""
    ignored: str = ""  # said once oned accepted a call and did nothing with it
    settled: bool | None = None  # the last confirmation's verdict on the VM it returned (None: no such read)
    waited_out: bool = False  # the last round made no call and its wait ended at the deadline
    deadline: float = math.inf  # time.monotonic()


@dataclass
class LoopEnd:
    result: Result
    action: Action
    attempts: int
    detail: str
    vm: VmView | None  # the last read (None: gone)
    acted_at: float | None


class VmLoopKind:
    """The per-kind parts of the loop. Subclasses give `read`, `decide` and `verdict`."""

    confirm_after_refusal = False  # after WRONG_STATE, wait for the VM to settle (else re-read and decide at once)

    def read(self, flow: Flow, vm_id: int) -> VmView | None:
        raise NotImplementedError

    def decide(self, vm: VmView | None, st: LoopState) -> Decision:
        raise NotImplementedError

    def verdict(self, vm: VmView, action: Action) -> Verdict:
        """When the VM (as it was before `action`) counts as settled."""
        raise NotImplementedError

    def wait(self, flow: Flow, vm_id: int, action: Action, verdict: Verdict, timeout_s: float,
             before: VmView | None) -> VmView | None:
        """Poll until `verdict` settles (`vm_steps.confirm`: ends early on an accepted call that changed nothing)."""
        return confirm(flow, vm_id, verdict, timeout_s, before)

    def reuse(self, seen: VmView, st: LoopState) -> bool:
        """Decide again from the confirmation's read instead of reading afresh."""
        return True

    def before_call(self, flow: Flow, vm: VmView, action: Action) -> None:
        """Right before a call (e.g. count it for the loop protection)."""

    def after_call(self, flow: Flow) -> None:
        """After a call that was (or may have been) applied."""


def run_vm_loop(flow: Flow, vm_id: int, kind: VmLoopKind, st: LoopState, vm: VmView | None = None) -> LoopEnd:
    """Until the decision says stop: read (or take the last confirmation's read), decide, act, confirm."""
    while True:
        if vm is None:
            vm = kind.read(flow, vm_id)
        decision = kind.decide(vm, st)
        if decision.stop is not None:
            return LoopEnd(decision.stop, decision.action, st.attempts, decision.why, vm, st.acted_at)
        assert vm is not None  # only a stop may be decided on a VM that is gone
        st.settled = None
        before: VmView | None = None
        acted = decision.action is not Action.NONE
        if acted:
            outcome = _call(flow, vm, kind, decision, st)
            if outcome is CallOutcome.DRY_RUN:
                return LoopEnd(Result.DRY_RUN, decision.action, st.attempts, decision.why, vm, None)
            if outcome is CallOutcome.GONE:
                return LoopEnd(Result.GONE, decision.action, st.attempts, "VM no longer exists", None, st.acted_at)
            if outcome is CallOutcome.ABANDONED:
                return LoopEnd(Result.FAILED, decision.action, st.attempts, ABANDONED_DETAIL, vm, st.acted_at)
            if outcome is CallOutcome.WRONG_STATE and not kind.confirm_after_refusal:
                vm = None  # refused: re-read and decide again
                continue
            before = None if decision.action is Action.MIGRATE and vm.resched else vm  # resched'ed: nothing sent
        vm = _confirm(flow, vm_id, kind, vm, before, acted, st)


def _call(flow: Flow, vm: VmView, kind: VmLoopKind, decision: Decision, st: LoopState) -> CallOutcome:
    """Make the decided call (through the gate in `act`) and note it."""
    st.action = decision.action
    st.attempts += 1
    kind.before_call(flow, vm, decision.action)
    outcome = act(flow, vm, decision.action)
    st.detail = decision.why + st.ignored
    if outcome is CallOutcome.WRONG_STATE:
        st.detail = f"{decision.why}; oned refused in {vm.state_name}"
    elif outcome in (CallOutcome.DONE, CallOutcome.UNKNOWN, CallOutcome.ABANDONED):
        if outcome is CallOutcome.UNKNOWN:
            st.detail = f"{decision.why}; outcome of the call unknown"
        st.acted_at = time.time()  # (or may have been, if unknown): the confirmation re-reads and tells
        kind.after_call(flow)
    return outcome


def _confirm(flow: Flow, vm_id: int, kind: VmLoopKind, vm: VmView, before: VmView | None, acted: bool,
             st: LoopState) -> VmView | None:
    """Wait for the VM to settle; the VM to decide from next (None: read it afresh)."""
    remaining = max(0.1, min(flow.rt.settings.worker.confirm_timeout_s, st.deadline - time.monotonic()))
    verdict = kind.verdict(vm, st.action)
    seen = kind.wait(flow, vm_id, st.action, verdict, remaining, before)
    st.waited_out = seen is None and not acted
    if seen is None:
        return None
    if before is not None and unchanged(seen, before):
        st.ignored = f"; oned accepted {st.action} and changed nothing"
    st.settled = verdict(seen)
    if seen.state == VmState.ACTIVE and seen.lcm_state in FAILURE_LCM_STATES:
        st.detail = f"{st.detail}; ended in {seen.state_name}"
    return seen if kind.reuse(seen, st) else None
