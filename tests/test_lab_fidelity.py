"""The lab does what oned does where oneha could be fooled (issue 9), each case read in OpenNebula's source."""

from __future__ import annotations

import base64
import os
import xml.etree.ElementTree as ET
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from oneha.lab.sim import LabCloud
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


def reply(lab: LabCloud, method: str, *args: Any) -> list[Any]:
    return list(getattr(xmlrpc.client.ServerProxy(lab.rpc_url), method)(lab.session, *args))


def test_recover_answers_as_oned_successful_no_ops_and_refusals() -> None:
    """`DispatchManager::recover/retry/delete_vm/delete_recreate/delete_vm_db` and `LifeCycleManager::recover`:
    what succeeds without changing anything, what goes straight to PENDING, and oned's refusals (5 elements)."""
    with running_lab(hosts=2, **LAB) as lab:
        url = lab.rpc_url
        running = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        pending = call(url, "lab.vm.create", {"STATE": "HOLD"})
        call(url, "one.vm.action", "release", pending)
        held = call(url, "lab.vm.create", {"STATE": "HOLD"})
        before = state_of(lab, running)
        for op in (0, 1, 2):  # LCM recover/retry of a RUNNING VM: logged, success
            assert reply(lab, "one.vm.recover", running, op)[:3] == [True, running, 0]
        assert state_of(lab, running) == before
        assert reply(lab, "one.vm.recover", pending, 4)[0] is True  # delete-recreate of PENDING: nothing to do
        assert reply(lab, "one.vm.recover", held, 4)[0] is True
        assert body(lab, "one.vm.info", held).findtext("STATE") in ("1", "3")  # PENDING (then scheduled)
        refused = reply(lab, "one.vm.recover", held, 0)
        if body(lab, "one.vm.info", held).findtext("STATE") == "1":
            assert refused == [False, f"[one.vm.recover] Could not perform a recover operation on VM {held}, "
                                      "wrong state PENDING.", 0x0800, -1, -1]  # elements 4-5 as a real oned 7.4 (seen)
        call(url, "one.vm.recover", running, 3)
        wait_until(lambda: state_of(lab, running)[0] == 6, 5, what="DONE")
        for op in (3, 5):  # delete / delete-db of a DONE VM: success
            assert reply(lab, "one.vm.recover", running, op)[0] is True
        assert reply(lab, "one.vm.recover", running, 4) == [
            False, "[one.vm.recover] Cannot delete-recreate a VM already in DONE state", 0x0800, -1, -1]
        assert reply(lab, "one.vm.recover", running, 2)[1].endswith(f"retry on VM {running}, wrong state DONE.")


def test_recover_ops_0_and_1_semantics() -> None:
    """Op 0 on UNKNOWN -> RUNNING like op 1; op 1 from EPILOG_FAILURE -> DONE, from PROLOG_MIGRATE_POWEROFF_FAILURE
    -> POWEROFF, from PROLOG_FAILURE -> BOOT (then RUNNING); op 0 on a failure state changes nothing."""
    with running_lab(hosts=2, vms=4, **LAB) as lab:
        url = lab.rpc_url
        call(url, "lab.vm.crash", 0, "crashed")
        wait_until(lambda: state_of(lab, 0)[1] == 16, 5, what="UNKNOWN")
        call(url, "one.vm.recover", 0, 0)
        assert state_of(lab, 0)[:2] == (3, 3)
        for vid, failure, op, expect in ((1, "EPILOG_FAILURE", 1, (6, 0)),
                                         (2, "PROLOG_MIGRATE_POWEROFF_FAILURE", 1, (8, 0)),
                                         (3, "PROLOG_FAILURE", 0, (3, 39))):
            call(url, "lab.vm.fail", vid, failure)
            call(url, "one.vm.recover", vid, op)
            assert state_of(lab, vid)[:2] == expect, failure
        call(url, "one.vm.recover", 3, 1)
        wait_until(lambda: state_of(lab, 3)[:2] == (3, 3), 5, what="PROLOG_FAILURE -> BOOT -> RUNNING")
        states = [s for _, k, i, s in call(url, "lab.oracle")["timeline"] if (k, i) == ("vm", 3)]
        assert states[-2:] == ["ACTIVE/BOOT", "ACTIVE/RUNNING"]
        # op 0 on a failed migration: back to the previous host in a new history record, booted there
        call(url, "one.vm.migrate", 0, 1, False)
        wait_until(lambda: state_of(lab, 0)[:2] == (3, 3), 5, what="migrated")
        call(url, "lab.vm.fail", 0, "PROLOG_MIGRATE_FAILURE")
        call(url, "one.vm.recover", 0, 0)
        wait_until(lambda: state_of(lab, 0)[:2] == (3, 3), 5, what="RUNNING on the previous host")
        hids = [h.findtext("HID") for h in body(lab, "one.vm.info", 0).iter("HISTORY")]
        assert hids == ["0", "1", "0"] and call(url, "lab.oracle")["running"]["0"] == [0]


def test_host_error_clears_resched_says_why_and_scheduler_migrations_say_migrate() -> None:
    """`InformationManager` host ERROR -> `Host::error` (template ERROR) and `trigger_monitor_done` on each VM
    (RUNNING -> UNKNOWN, RESCHED cleared); the scheduler's move of a resched'ed VM records history ACTION MIGRATE."""
    with running_lab(hosts=4, vms=4, clusters=1, **LAB) as lab:
        url = lab.rpc_url
        call(url, "one.vm.action", "resched", 1)  # on host 1: the scheduler moves it, action MIGRATE (1)
        wait_until(lambda: body(lab, "one.vm.info", 1).findtext("HISTORY_RECORDS/HISTORY[last()]/HID") != "1"
                   and state_of(lab, 1)[:2] == (3, 3), 5, what="resched'ed VM moved")
        assert body(lab, "one.vm.info", 1).findall("HISTORY_RECORDS/HISTORY")[0].findtext("ACTION") == "1"
        with lab.cloud.lock:  # a resched pending when the host dies (the scheduler had no room yet)
            lab.cloud.vms[0].resched = True
            lab.cloud.pending.discard(0)
            lab.cloud._touch_vm(lab.cloud.vms[0])
        call(url, "lab.host.kill", 0)
        wait_until(lambda: state_of(lab, 0)[1] == 16, 5, what="UNKNOWN")
        assert body(lab, "one.vm.info", 0).findtext("RESCHED") == "0"
        error = body(lab, "one.host.info", 0).findtext("TEMPLATE/ERROR") or ""
        assert error.endswith("Error monitoring Host host0000 (0): ")
        call(url, "lab.host.revive", 0)
        wait_until(lambda: body(lab, "one.host.info", 0).findtext("STATE") == "2", 5, what="MONITORED")
        assert body(lab, "one.host.info", 0).find("TEMPLATE/ERROR") is None


def test_failure_replies_have_five_elements() -> None:
    with running_lab(hosts=1, **LAB) as lab:
        # as a real oned 7.4 answers (seen): the missing object's id, then -1
        assert reply(lab, "one.vm.info", 42) == [False, "[one.vm.info] Error getting virtual machine [42].",
                                                 0x0400, 42, -1]


def test_a_failing_tick_is_logged_counted_and_the_clock_goes_on() -> None:
    with running_lab(hosts=2, vms=1, **LAB) as lab:
        real = lab.cloud.tick
        calls = {"n": 0}

        def flaky() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected")
            real()

        lab.cloud.tick = flaky  # type: ignore[method-assign]
        call(lab.rpc_url, "one.vm.action", "poweroff", 0)
        wait_until(lambda: state_of(lab, 0)[0] == 8, 5, what="time still moves: POWEROFF")
        assert call(lab.rpc_url, "lab.stats")["tick_errors"] == 1


def test_frames_object_key_first_and_reordering_on_request() -> None:
    """one_hm.rb publishes `EVENT HOST 3/ERROR/ ` before `EVENT STATE HOST/ERROR//3 `; its 15 threads may deliver
    changes of different objects out of order (lab.faults event_reorder_rate); a OneFlow VM adds
    `EVENT SERVICE <id> `."""
    import zmq

    with running_lab(hosts=3, **LAB) as lab:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"EVENT ")
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        sock.connect(lab.events_url)
        try:
            def heard() -> bool:
                call(lab.rpc_url, "one.host.status", 2, 1)
                call(lab.rpc_url, "one.host.status", 2, 0)
                return sock.poll(100) != 0
            wait_until(heard, 10, what="subscribed")
            while sock.poll(300):
                sock.recv_multipart()
            call(lab.rpc_url, "one.host.status", 1, 1)
            keys = [sock.recv_multipart()[0] for _ in range(2)]
            assert keys == [b"EVENT HOST 1/DISABLED/ ", b"EVENT STATE HOST/DISABLED//1 "]
            call(lab.rpc_url, "lab.faults", {"event_reorder_rate": 1.0})
            call(lab.rpc_url, "one.host.status", 1, 0)  # held back...
            call(lab.rpc_url, "one.host.status", 2, 1)  # ...until this one, of another object, is out
            got = [sock.recv_multipart()[0] for _ in range(4)]
            assert got == [b"EVENT HOST 2/DISABLED/ ", b"EVENT STATE HOST/DISABLED//2 ",
                           b"EVENT HOST 1/MONITORED/ ", b"EVENT STATE HOST/MONITORED//1 "]
            assert call(lab.rpc_url, "lab.stats")["events_reordered"] == 1
            call(lab.rpc_url, "lab.faults", {"event_reorder_rate": 0.0})
            vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "USER_TEMPLATE": {"SERVICE_ID": "12"}})
            frames = [sock.recv_multipart() for _ in range(3)]
            assert [f[0] for f in frames] == [f"EVENT VM {vid}/ACTIVE/RUNNING ".encode(),
                                              f"EVENT STATE VM/ACTIVE/RUNNING/{vid} ".encode(), b"EVENT SERVICE 12 "]
            assert b"<SERVICE_ID>12</SERVICE_ID>" in base64.b64decode(frames[2][1])
        finally:
            sock.close(linger=0)


def _xsd_dir() -> Path:
    """OpenNebula's XSDs live in shared/ beside the checkout (CI lays a copy there), never in the repository."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "opennebula-xsd"
    candidates = [os.environ.get("ONEHA_XSD_DIR", ""), str(beside), "/work/shared/opennebula-xsd"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), Path(candidates[-1]))


XSD = _xsd_dir()
NS = "{http://opennebula.org/XMLSchema}"


def validate(name: str, doc: str) -> list[str]:
    """Errors of `doc` against OpenNebula's schema `name` (oned writes no namespace; the XSDs have one)."""
    from lxml import etree

    schema = etree.XMLSchema(etree.parse(str(XSD / name)))
    root = etree.fromstring(doc.encode())
    for element in root.iter():
        element.tag = NS + element.tag
    schema.validate(root)
    return [e.message for e in schema.error_log]


@pytest.mark.skipif(not XSD.is_dir(), reason="OpenNebula's XSDs are not here")
def test_every_vm_and_host_body_validates_against_opennebulas_schemas() -> None:
    """vm.info (vm.xsd), infoextended / infoset(true) (vm_pool_extended.xsd), vmpool.info / infoset(false)
    (vm_pool.xsd), hosts: for VMs in every kind of state the lab produces."""
    with running_lab(hosts=4, vms=8, clusters=2, **LAB) as lab:
        url = lab.rpc_url
        call(url, "one.vm.migrate", 0, 2, False)
        call(url, "one.vm.action", "poweroff", 1)
        call(url, "lab.vm.fail", 2, "BOOT_FAILURE")
        call(url, "lab.vm.create", {"HOST": 3, "STATE": "SUSPENDED", "HA": "NO",
                                    "USER_TEMPLATE": {"LABELS": "x", "SCHED_REQUIREMENTS": "ID>0"}})
        call(url, "lab.host.kill", 3)
        wait_until(lambda: state_of(lab, 3)[1] == 16, 5, what="UNKNOWN")
        call(url, "one.vm.recover", 7, 3)
        wait_until(lambda: state_of(lab, 7)[0] == 6, 5, what="DONE")
        ids = ",".join(str(i) for i in range(9))
        bodies = [("vm.xsd", reply(lab, "one.vm.info", i)[1]) for i in range(9)]
        bodies += [("vm_pool_extended.xsd", reply(lab, "one.vmpool.infoextended", -2, -1, -1, -2)[1]),
                   ("vm_pool_extended.xsd", reply(lab, "one.vmpool.infoset", ids, True)[1]),
                   ("vm_pool.xsd", reply(lab, "one.vmpool.info", -2, -1, -1, -2)[1]),
                   ("vm_pool.xsd", reply(lab, "one.vmpool.infoset", ids, False)[1]),
                   ("host_pool.xsd", reply(lab, "one.hostpool.info")[1]),
                   *[("host.xsd", reply(lab, "one.host.info", h)[1]) for h in range(4)]]
        for name, doc in bodies:
            assert validate(name, doc) == [], (name, doc[:300])
        # A VM never placed has no TM_MAD_SYSTEM in oned either (`check_tm_mad_disks` adds it at deploy), although
        # vm.xsd requires it: that is the only complaint.
        held = reply(lab, "one.vm.info", call(url, "lab.vm.create", {"STATE": "HOLD"}))[1]
        assert validate("vm.xsd", held) != []
        assert validate("vm.xsd", held.replace("<VCPU>", "<TM_MAD_SYSTEM>ssh</TM_MAD_SYSTEM><VCPU>")) == []


def test_clusterpool_info() -> None:
    with running_lab(hosts=4, clusters=2, **LAB) as lab:
        pool = body(lab, "one.clusterpool.info")
        clusters = {c.findtext("NAME"): c for c in pool.findall("CLUSTER")}
        assert sorted(clusters) == ["cluster1", "default"]
        assert [i.text for i in clusters["cluster1"].findall("HOSTS/ID")] == ["1", "3"]
        assert [i.text for i in clusters["cluster1"].findall("DATASTORES/ID")] == ["1", "101"]
        assert [e.tag for e in clusters["default"]] == ["ID", "NAME", "HOSTS", "DATASTORES", "VNETS", "TEMPLATE"]
