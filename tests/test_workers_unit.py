"""Pure logic of the workers: selection, ordering, decisions, storm arithmetic, backoff, fencing contract."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import sys
import time
from dataclasses import replace

from oneha.backoff import Backoff, full_jitter
from oneha.opennebula import HostState, HostView, LcmState, VmState, VmView, decode_template
from oneha.settings import ClusterPolicy
from oneha.waiting import wait_until
from oneha.workers.fence import host_xml, run_fence
from oneha.workers.host_flow import storm_reason
from oneha.workers.vm_steps import choose_action, has_left_host, in_transition, select_vms


def vm(vid: int, state: VmState = VmState.ACTIVE, lcm: LcmState = LcmState.UNKNOWN, hid: int = 1, prio: int = 0,
       ha: str | None = None, ds: int = 0, resched: bool = False) -> VmView:
    tmpl = {"HA_PRIORITY": str(prio)}
    if ha is not None:
        tmpl["HA"] = ha
    return VmView(vid, f"vm{vid}", state, lcm, hid, f"host{hid}", ds, 0, 0, resched, tmpl)


def host(hid: int, state: HostState = HostState.MONITORED, cluster: int = 0) -> HostView:
    return HostView(hid, f"host{hid}", state, cluster)


def test_select_takes_a_poweroff_nobody_asked_for() -> None:
    crashed = VmView(9, "vm9", VmState.POWEROFF, LcmState.LCM_INIT, 1, "host1", 0, history_action=44)
    asked = VmView(10, "vm10", VmState.POWEROFF, LcmState.LCM_INIT, 1, "host1", 0, history_action=19)
    chosen, _ = select_vms([crashed, asked], 1, include_suspended=False)
    assert [v.id for v in chosen] == [9]


def test_select_keeps_this_hosts_active_vms_by_priority_and_skips_opted_out() -> None:
    vms = [vm(1, prio=0), vm(2, prio=3), vm(3, prio=3), vm(4, hid=2, prio=9), vm(5, ha="NO", prio=9),
           vm(6, VmState.SUSPENDED, LcmState.LCM_INIT, prio=5), vm(7, VmState.POWEROFF, LcmState.LCM_INIT),
           vm(8, VmState.DONE, LcmState.LCM_INIT)]
    chosen, out = select_vms(vms, 1, include_suspended=False)
    assert [v.id for v in chosen] == [2, 3, 1]
    assert [v.id for v in out] == [5]
    chosen, _ = select_vms(vms, 1, include_suspended=True)
    assert [v.id for v in chosen] == [6, 2, 3, 1, 7]


def test_has_left_host() -> None:
    assert not has_left_host(vm(1), 1)  # UNKNOWN on the failed host
    assert has_left_host(vm(1, VmState.PENDING, LcmState.LCM_INIT), 1)
    assert has_left_host(vm(1, lcm=LcmState.CLEANUP_RESUBMIT), 1)
    assert has_left_host(vm(1, lcm=LcmState.PROLOG_MIGRATE_UNKNOWN, hid=2), 1)
    assert has_left_host(vm(1, lcm=LcmState.RUNNING, hid=2), 1)
    assert not has_left_host(vm(1, lcm=LcmState.PROLOG_MIGRATE_UNKNOWN_FAILURE, hid=2), 1)
    assert not has_left_host(vm(1, VmState.POWEROFF, LcmState.LCM_INIT), 1)
    assert has_left_host(vm(1, VmState.POWEROFF, LcmState.LCM_INIT, hid=2), 1)
    assert not has_left_host(vm(1, VmState.PENDING, LcmState.LCM_INIT), 1, "delete")
    assert has_left_host(vm(1, VmState.DONE, LcmState.LCM_INIT), 1, "delete")
    assert in_transition(vm(1, lcm=LcmState.CLEANUP_RESUBMIT)) and not in_transition(vm(1))


def test_choose_action_migrate_only_on_shared_datastores() -> None:
    migrate = ClusterPolicy(host_action="migrate")
    assert choose_action(vm(1, ds=0), migrate, frozenset({0}))[0] == "migrate"
    assert choose_action(vm(1, ds=101), migrate, frozenset({0})) == ("recreate",
                                                                      "fallback: system datastore 101 not shared")
    assert choose_action(vm(1, ds=0), migrate, frozenset({0}), migrate_failed=True)[0] == "recreate"
    assert choose_action(vm(1, VmState.SUSPENDED, LcmState.LCM_INIT), migrate, frozenset({0}))[0] == "recreate"
    strict = ClusterPolicy(host_action="migrate", migrate_fallback="none")
    assert choose_action(vm(1, ds=101), strict, frozenset({0}))[0] == "report"
    assert choose_action(vm(1), ClusterPolicy(host_action="delete"), frozenset())[0] == "delete"
    assert choose_action(vm(1), ClusterPolicy(host_action="recreate"), frozenset())[0] == "recreate"


def test_choose_action_on_a_proven_dead_host_never_migrates_a_running_vm() -> None:
    """OFFLINE keeps its VMs RUNNING in oned; a resched from RUNNING saves the VM on the dead host first."""
    migrate = ClusterPolicy(host_action="migrate")
    running = vm(1, lcm=LcmState.RUNNING, ds=0)
    assert choose_action(running, migrate, frozenset({0}))[0] == "migrate"  # oned's ERROR path: as before
    action, why = choose_action(running, migrate, frozenset({0}), host_proven=True)
    assert action == "recreate" and "proven dead" in why
    resched = replace(running, resched=True)  # even one already rescheduled: its migration would fail too
    assert choose_action(resched, migrate, frozenset({0}), host_proven=True)[0] == "recreate"
    strict = ClusterPolicy(host_action="migrate", migrate_fallback="none")
    assert choose_action(running, strict, frozenset({0}), host_proven=True)[0] == "report"
    assert choose_action(vm(1, ds=0), migrate, frozenset({0}), host_proven=True)[0] == "migrate"  # UNKNOWN: fine
    assert choose_action(running, ClusterPolicy(host_action="recreate"), frozenset(), host_proven=True)[0] == \
        "recreate"


def test_storm_reason() -> None:
    four = [host(0), host(1, HostState.ERROR), host(2), host(3)]
    assert storm_reason(four, 1, 0.4, 5) is None
    two_failed = [host(0), host(1, HostState.ERROR), host(2, HostState.ERROR), host(3)]
    assert "2/4" in (storm_reason(two_failed, 2, 0.4, 5) or "")
    assert storm_reason([host(0), host(1, HostState.ERROR)], 1, 0.4, 5) is None  # one host is never a storm
    assert "6 host failures" in (storm_reason(four, 6, 0.4, 5) or "")
    assert storm_reason(two_failed, 2, 0.5, 5) is None  # not MORE than half


def test_full_jitter_is_bounded_and_grows() -> None:
    rng = random.Random(1)
    samples = [full_jitter(a, 0.2, 5.0, rng) for a in range(10) for _ in range(50)]
    assert all(0 <= s <= 5.0 for s in samples)
    assert max(full_jitter(0, 0.2, 5.0, rng) for _ in range(100)) <= 0.2
    assert max(full_jitter(8, 0.2, 5.0, rng) for _ in range(100)) > 1.0


def test_host_xml_round_trips_through_the_fence_contract() -> None:
    h = HostView(7, "node7", HostState.ERROR, 2, (1, 2), {"FENCE_IP": "10.0.0.7", "HOSTNAME": "node7"})
    event = decode_template(base64.b64encode(host_xml(h)))
    assert event.host_id == 7 and event.host is not None  # type: ignore[union-attr]
    assert event.host.template["FENCE_IP"] == "10.0.0.7"  # type: ignore[union-attr]


def test_fence_contract_fail_closed_and_no_shell(tmp_path) -> None:
    h = host(3, HostState.ERROR)
    assert run_fence(ClusterPolicy(fencing="none"), h).result == "skipped"
    nf = run_fence(ClusterPolicy(fencing=None), h)
    assert nf.result == "not_configured" and not nf.ok and nf.detail == "fencing not configured"
    out = tmp_path / "stdin"
    script = f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())"
    ok = run_fence(ClusterPolicy(fencing=[sys.executable, "-c", script]), h)
    assert ok.ok and ok.attempts == 1
    assert decode_template(out.read_bytes()).host_id == 3  # base64 host XML on stdin
    calls: list[int] = []
    bad = run_fence(ClusterPolicy(fencing=[sys.executable, "-c", "import sys; sys.exit(3)"], fence_attempts=2), h,
                    lambda: calls.append(1))
    assert bad.result == "failed" and bad.attempts == 2 and "exit 3" in bad.detail and len(calls) == 2
    slow = run_fence(ClusterPolicy(fencing=[sys.executable, "-c", "import time; time.sleep(30)"],
                                   fence_timeout_s=0.3, fence_attempts=1), h)
    assert slow.result == "failed" and "timed out" in slow.detail
    semicolon = run_fence(ClusterPolicy(fencing=["true; false"], fence_attempts=1), h)  # no shell: no such file
    assert semicolon.result == "failed" and "cannot run" in semicolon.detail


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it ran out, only its parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_fence_timeout_kills_the_whole_process_group(tmp_path) -> None:
    """A shell script's child (ipmitool, curl; here `sleep 600`) must not outlive the timed-out attempt: it could
    power the host off after the incident was declared fence_failed."""
    pidfile = tmp_path / "pid"
    script = f"sleep 600 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    result = run_fence(ClusterPolicy(fencing=["sh", "-c", script], fence_timeout_s=0.5, fence_attempts=1),
                       host(3, HostState.ERROR))
    assert result.result == "failed" and "timed out" in result.detail
    assert time.monotonic() - started < 5
    pid = int(pidfile.read_text())
    try:
        wait_until(lambda: not _alive(pid), 5, what=f"the fence command's child {pid} to die")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_fence_command_gets_a_minimal_environment(tmp_path, monkeypatch) -> None:
    """oned's credentials (and anything else of the worker's environment) never reach a fence tool; PATH, the
    locale and the variables the shipped fence scripts document do, and names listed in worker.fence_env."""
    monkeypatch.setenv("ONEHA_ONED__SESSION", "oneadmin:s3cret")
    monkeypatch.setenv("ONEHA_REDIS__URL", "redis://:pw@127.0.0.1:1/0")
    monkeypatch.setenv("ONE_AUTH", "/etc/one/one_auth")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("ONEHA_FENCE_DEADLINE_S", "30")
    monkeypatch.setenv("ONEHA_IPMITOOL", "/usr/bin/ipmitool")
    monkeypatch.setenv("MY_FENCE_SITE", "rack-7")
    out = tmp_path / "env.json"
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    result = run_fence(ClusterPolicy(fencing=[sys.executable, "-c", script], fence_attempts=1),
                       host(3, HostState.ERROR), env_names=["MY_FENCE_SITE"])
    assert result.ok, result.detail
    env = json.loads(out.read_text())
    env.pop("LC_CTYPE", None)  # Python may set it itself (PEP 538 locale coercion)
    assert env == {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "ONEHA_FENCE_DEADLINE_S": "30", "ONEHA_IPMITOOL": "/usr/bin/ipmitool", "MY_FENCE_SITE": "rack-7"}
    assert not any("s3cret" in v or "pw@" in v for v in env.values())


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next_s() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_s() == 0.1


class _FakeOned:
    """host.status whose outcome is unknown (no answer), applied by oned a little later."""

    def __init__(self, applied_after_reads: int, error: str = "unknown") -> None:
        self.status_calls: list[tuple[int, int]] = []
        self.reads = 0
        self.applied_after_reads = applied_after_reads
        self.error = error

    def host_status(self, hid: int, status: int) -> None:
        from oneha.opennebula import ErrorKind
        from oneha.workers.oned import OnedError

        self.status_calls.append((hid, int(status)))
        kind = ErrorKind.UNKNOWN if self.error == "unknown" else ErrorKind.TRANSIENT
        raise OnedError("one.host.status", kind, "read timeout")

    def host_info(self, hid: int) -> HostView:
        self.reads += 1
        state = HostState.OFFLINE if self.reads > self.applied_after_reads else HostState.MONITORED
        return host(hid, state)


def _flow(oned: _FakeOned, confirm_s: float = 5.0) -> object:
    from types import SimpleNamespace

    from oneha.settings import WorkerSettings

    events: list[tuple[str, dict[str, object]]] = []
    rt = SimpleNamespace(oned=oned, settings=SimpleNamespace(worker=WorkerSettings(offline_confirm_s=confirm_s)),
                         check_not_paused=lambda: None, store=SimpleNamespace(audit=lambda *a, **k: None))
    return SimpleNamespace(rt=rt, incident=SimpleNamespace(id=1, extra={"proof": "bmc"}), trail=None,
                           check_lease=lambda: None, check_lease_local=lambda: None,
                           emit=lambda e, **f: events.append((e, f)), events=events)


def test_take_host_offline_reads_back_an_unknown_outcome_and_never_sends_it_again() -> None:
    from oneha.workers.host_flow import take_host_offline

    oned = _FakeOned(applied_after_reads=3)
    flow = _flow(oned)
    assert take_host_offline(flow, host(4)) is True  # type: ignore[arg-type]
    assert oned.status_calls == [(4, 2)] and oned.reads == 4
    assert flow.events[0][0] == "outcome_unknown"  # type: ignore[attr-defined]


def test_take_host_offline_not_confirmed_is_false_and_an_offline_host_costs_no_call() -> None:
    from oneha.workers.host_flow import take_host_offline

    refused = _FakeOned(applied_after_reads=10**6, error="transient")
    assert take_host_offline(_flow(refused), host(4)) is False  # type: ignore[arg-type]
    assert refused.status_calls == [(4, 2)] and refused.reads == 1  # an answered failure: one read, no wait
    unknown = _FakeOned(applied_after_reads=10**6)
    assert take_host_offline(_flow(unknown, confirm_s=0.3), host(4)) is False  # type: ignore[arg-type]
    assert unknown.status_calls == [(4, 2)] and unknown.reads > 1
    already = _FakeOned(applied_after_reads=0)
    assert take_host_offline(_flow(already), host(4, HostState.OFFLINE)) is True  # type: ignore[arg-type]
    assert already.status_calls == [] and already.reads == 0


def test_awaits_unknown_only_for_a_running_vm_that_could_migrate_until_the_deadline() -> None:
    from oneha.workers.vm_task import awaits_unknown

    migrate = ClusterPolicy(host_action="migrate")
    running = vm(1, lcm=LcmState.RUNNING, ds=0)
    later = time.time() + 30
    assert awaits_unknown(running, migrate, frozenset({0}), False, later)
    assert not awaits_unknown(running, migrate, frozenset({0}), False, time.time() - 1)  # waited long enough
    assert not awaits_unknown(running, migrate, frozenset(), False, later)  # local DS: fallback at once
    assert not awaits_unknown(running, migrate, frozenset({0}), True, later)  # a migration failed already
    assert not awaits_unknown(vm(1, ds=0), migrate, frozenset({0}), False, later)  # UNKNOWN already
    assert not awaits_unknown(running, ClusterPolicy(host_action="recreate"), frozenset({0}), False, later)
