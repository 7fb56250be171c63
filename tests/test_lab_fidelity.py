"""The lab does what oned does where oneha could be fooled (issue 9), each case read in OpenNebula's source."""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xmlrpc.client
from typing import Any

from lab.sim import LabCloud
from oneha.waiting import wait_until
from tests.labkit import call, running_lab

LAB = {"monitoring_interval_s": 0.3, "step_delay_s": 0.03}


def body(lab: LabCloud, method: str, *args: Any) -> ET.Element:
    reply = getattr(xmlrpc.client.ServerProxy(lab.rpc_url), method)(lab.session, *args)
    assert reply[0] is True, reply
    return ET.fromstring(reply[1])


def test_short_bodies_drop_the_user_template_extended_and_info_keep_it() -> None:
    """`VirtualMachineTemplate::to_xml_short`: only LABELS/ERROR/SCHED_MESSAGE (not empty), SCHED_* and
    USER_PRIORITY survive in vmpool.info and infoset(ids, false); infoextended / infoset(ids, true) keep all but
    only the last history record (`to_xml_extended(xml, 1, …)`); vm.info has every record."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vid = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING", "HA": "NO", "HA_PRIORITY": 7,
                                          "USER_TEMPLATE": {"LABELS": "web", "ERROR": "", "USER_PRIORITY": "3",
                                                            "SCHED_REQUIREMENTS": "ID!=2"}})
        bare = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"})
        call(url, "one.vm.migrate", vid, 1, False)  # a second history record
        wait_until(lambda: int(body(lab, "one.vm.info", vid).findtext("LCM_STATE") or 0) == 3, 5, what="RUNNING")
        shorts = [body(lab, "one.vmpool.info", -2, vid, vid, -1).find("VM"),
                  body(lab, "one.vmpool.infoset", str(vid), False).find("VM")]
        for short in shorts:
            assert short is not None
            user = {e.tag: e.text or "" for e in short.find("USER_TEMPLATE") or []}
            assert user == {"LABELS": "web", "SCHED_REQUIREMENTS": "ID!=2", "USER_PRIORITY": "3"}
            assert [e.tag for e in short.find("TEMPLATE") or []] == ["CPU", "MEMORY", "VCPU"]
            assert len(short.findall("HISTORY_RECORDS/HISTORY")) == 1
        bare_short = body(lab, "one.vmpool.infoset", str(bare), False).find("VM/USER_TEMPLATE")
        assert bare_short is not None and len(bare_short) == 0
        for ext in (body(lab, "one.vmpool.infoset", str(vid), True).find("VM"),
                    next(v for v in body(lab, "one.vmpool.infoextended", -2, -1, -1, -1)
                         if v.findtext("ID") == str(vid))):
            assert ext is not None
            assert ext.findtext("USER_TEMPLATE/HA") == "NO" and ext.findtext("USER_TEMPLATE/HA_PRIORITY") == "7"
            assert [h.findtext("SEQ") for h in ext.findall("HISTORY_RECORDS/HISTORY")] == ["1"]
        info = body(lab, "one.vm.info", vid)
        assert info.findtext("USER_TEMPLATE/HA") == "NO"
        assert [h.findtext("SEQ") for h in info.findall("HISTORY_RECORDS/HISTORY")] == ["0", "1"]


def state_of(lab: LabCloud, vid: int) -> tuple[int, int, str]:
    """(STATE, LCM_STATE, last history ACTION) from vm.info."""
    vm = body(lab, "one.vm.info", vid)
    return int(vm.findtext("STATE") or -1), int(vm.findtext("LCM_STATE") or -1), \
        vm.findall("HISTORY_RECORDS/HISTORY")[-1].findtext("ACTION") or ""


def test_vanished_domain_goes_poweroff_with_action_monitor_and_counts_as_lost() -> None:
    """MISSING_STATE = POWEROFF (default): `trigger_monitor_poweroff` writes ACTION 44; the oracle calls it lost.
    A resume opens a new history record with ACTION RESUME (11); an operator's poweroff is not lost."""
    with running_lab(hosts=2, vms=2, **LAB) as lab:
        url = lab.rpc_url
        call(url, "lab.vm.crash", 0)
        assert state_of(lab, 0)[:2] == (3, 3)  # oned has not noticed yet
        wait_until(lambda: state_of(lab, 0)[0] == 8, 5, what="POWEROFF")
        assert state_of(lab, 0) == (8, 0, "44")
        timeline = [s for _, k, i, s in call(url, "lab.oracle")["timeline"] if k == "vm" and i == 0]
        assert timeline[-2:] == ["ACTIVE/SHUTDOWN_POWEROFF", "POWEROFF"]
        assert call(url, "lab.oracle")["lost"] == [0]
        call(url, "one.vm.action", "poweroff", 1)
        wait_until(lambda: state_of(lab, 1)[0] == 8, 5, what="operator POWEROFF")
        assert state_of(lab, 1)[2] == "19" and call(url, "lab.oracle")["lost"] == [0]
        call(url, "one.vm.action", "resume", 0)
        wait_until(lambda: state_of(lab, 0)[:2] == (3, 3), 5, what="RUNNING again")
        seqs = [(h.findtext("SEQ"), h.findtext("ACTION")) for h in body(lab, "one.vm.info", 0).iter("HISTORY")]
        assert seqs == [("0", "44"), ("1", "11")]
        assert call(url, "lab.oracle")["lost"] == []


def test_missing_state_unknown_and_libvirt_crash_reasons_give_unknown() -> None:
    with running_lab(hosts=2, vms=2, missing_state="UNKNOWN", **LAB) as lab:
        call(lab.rpc_url, "lab.vm.crash", 0)
        wait_until(lambda: state_of(lab, 0)[:2] == (3, 16), 5, what="UNKNOWN (MISSING_STATE = UNKNOWN)")
    with running_lab(hosts=2, vms=2, **LAB) as lab:
        call(lab.rpc_url, "lab.vm.crash", 1, "watchdog")
        wait_until(lambda: state_of(lab, 1)[:2] == (3, 16), 5, what="UNKNOWN (libvirt: paused, watchdog)")


def test_state_updates_are_ignored_within_the_guard_after_running_starts() -> None:
    """`test_and_trigger`: no state change from the probe within 30 s (scaled: state_guard_s) of RSTIME."""
    with running_lab(hosts=2, vms=1, state_guard_s=1.5, **LAB) as lab:
        start = body(lab, "one.vm.info", 0)  # created RUNNING just now
        assert start.findtext("LCM_STATE") == "3"
        call(lab.rpc_url, "lab.vm.crash", 0, "crashed")
        wait_until(lambda: state_of(lab, 0)[1] == 16, 5, what="UNKNOWN after the guard")
        stamps = [t for t, k, i, s in call(lab.rpc_url, "lab.oracle")["timeline"] if (k, i, s) ==
                  ("vm", 0, "ACTIVE/UNKNOWN")]
        first = call(lab.rpc_url, "lab.oracle")["timeline"][0][0]
        assert stamps and stamps[0] - first >= 1.4


def test_power_blip_within_monitoring_leaves_vms_poweroff_and_lost() -> None:
    """Host off and on again before anyone declared it ERROR: its domains are gone, so the probe reports them
    missing: POWEROFF with ACTION 44 (issue 11, defect 5)."""
    with running_lab(hosts=2, vms=2, **{**LAB, "monitoring_interval_s": 1.0}) as lab:
        call(lab.rpc_url, "lab.host.kill", 0)
        call(lab.rpc_url, "lab.host.revive", 0)
        wait_until(lambda: state_of(lab, 0)[0] == 8, 5, what="POWEROFF")
        assert state_of(lab, 0)[2] == "44" and call(lab.rpc_url, "lab.oracle")["lost"] == [0]
        host_states = [s for _, k, i, s in call(lab.rpc_url, "lab.oracle")["timeline"] if (k, i) == ("host", 0)]
        assert "ERROR" not in host_states


def test_boot_poweroff_on_a_dead_host_falls_back_to_poweroff() -> None:
    """`trigger_deploy_failure`: BOOT_POWEROFF -> POWEROFF (not RUNNING on a host that runs nothing)."""
    with running_lab(hosts=2, **{**LAB, "monitoring_interval_s": 5.0}) as lab:
        vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "POWEROFF"})
        call(lab.rpc_url, "lab.host.kill", 0)
        call(lab.rpc_url, "one.vm.action", "resume", vid)
        wait_until(lambda: state_of(lab, vid)[0] == 8, 5, what="back to POWEROFF")
        states = [s for _, k, i, s in call(lab.rpc_url, "lab.oracle")["timeline"] if (k, i) == ("vm", vid)]
        assert states[-2:] == ["ACTIVE/BOOT_POWEROFF", "POWEROFF"]
        assert str(vid) not in call(lab.rpc_url, "lab.oracle")["running"]
