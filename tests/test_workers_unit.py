"""Pure logic of the workers: selection, ordering, decisions, storm arithmetic, backoff, fencing contract."""

from __future__ import annotations

import base64
import random
import sys

from oneha.opennebula import HostState, HostView, LcmState, VmState, VmView, decode_template
from oneha.settings import ClusterPolicy
from oneha.workers.fence import host_xml, run_fence
from oneha.workers.host_flow import storm_reason
from oneha.workers.oned import full_jitter
from oneha.workers.vm_steps import choose_action, has_left_host, in_transition, select_vms


def vm(vid: int, state: VmState = VmState.ACTIVE, lcm: LcmState = LcmState.UNKNOWN, hid: int = 1, prio: int = 0,
       ha: str | None = None, ds: int = 0, resched: bool = False) -> VmView:
    tmpl = {"HA_PRIORITY": str(prio)}
    if ha is not None:
        tmpl["HA"] = ha
    return VmView(vid, f"vm{vid}", state, lcm, hid, f"host{hid}", ds, 0, 0, resched, tmpl)


def host(hid: int, state: HostState = HostState.MONITORED, cluster: int = 0) -> HostView:
    return HostView(hid, f"host{hid}", state, cluster)


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
