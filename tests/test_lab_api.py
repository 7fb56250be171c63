"""The lab's XML-RPC API through pyone 7.3.80, unmodified: parsing, attributes, oned's error codes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import pyone
import pytest

from oneha.lab.sim import LabCloud
from oneha.opennebula import HostState, LcmState, VmState
from oneha.waiting import wait_until
from tests.labkit import call, running_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCloud]:
    with running_lab(hosts=4, vms=8, clusters=2) as cloud:
        yield cloud


@pytest.fixture(scope="module")
def one(lab: LabCloud) -> Any:
    return pyone.OneServer(lab.rpc_url, session=lab.session)


def raw(lab: LabCloud) -> Any:
    return xmlrpc.client.ServerProxy(lab.rpc_url)


def test_hostpool_and_host_info(one: Any) -> None:
    pool = one.hostpool.info()
    assert [int(h.ID) for h in pool.HOST] == [0, 1, 2, 3]
    host = one.host.info(1)
    assert host.NAME == "host0001"
    assert int(host.STATE) == HostState.MONITORED
    assert int(host.CLUSTER_ID) == 1 and host.CLUSTER == "cluster1"
    assert host.TEMPLATE["FENCE_IP"] == "10.1.0.2"
    assert sorted(int(i) for i in host.VMS.ID) == [1, 5]
    assert one.host.info(1, False).NAME == "host0001"  # the Ruby OCA's extra decrypt argument


def test_vm_info_full_body(one: Any) -> None:
    vm = one.vm.info(2)
    assert int(vm.ID) == 2 and vm.NAME == "vm2"
    assert int(vm.STATE) == VmState.ACTIVE and int(vm.LCM_STATE) == LcmState.RUNNING
    assert vm.USER_TEMPLATE["HA_PRIORITY"] == "2"
    hist = vm.HISTORY_RECORDS.HISTORY
    assert len(hist) == 1
    assert (int(hist[0].SEQ), hist[0].HOSTNAME, int(hist[0].HID), int(hist[0].DS_ID)) == (0, "host0002", 2, 0)
    assert int(hist[0].STIME) > 0 and int(hist[0].ETIME) == 0
    assert vm.PERMISSIONS is not None  # full body


def test_vmpool_variants(one: Any, lab: LabCloud) -> None:
    pool = one.vmpool.info(-2, -1, -1, -1)
    assert len(pool.VM) >= 8
    vm1 = next(v for v in pool.VM if int(v.ID) == 1)
    assert vm1.HISTORY_RECORDS.HISTORY[0].HOSTNAME == "host0001"
    assert int(vm1.HISTORY_RECORDS.HISTORY[0].DS_ID) == 101  # cluster 1's local system datastore
    assert len(one.vmpool.info(-2, 2, 4, -1).VM) == 3
    assert len(one.vmpool.infoextended(-2, -1, -1, 3).VM) >= 8
    chosen = one.vmpool.infoset("1,3,999", False)
    assert sorted(int(v.ID) for v in chosen.VM) == [1, 3]
    assert one.vmpool.infoset("", True).VM == []
    body = raw(lab).one.vmpool.info(lab.session, -2, -1, -1, -1, "")  # Ruby OCA form
    assert body[0] is True and body[1].startswith("<VM_POOL><VM><ID>0</ID>")


def test_pool_bodies_are_short_info_bodies_full(lab: LabCloud) -> None:
    proxy = raw(lab)
    short = ET.fromstring(proxy.one.vmpool.info(lab.session, -2, 0, 0, -1)[1]).find("VM")
    full = ET.fromstring(proxy.one.vm.info(lab.session, 0)[1])
    assert short is not None
    assert short.find("PERMISSIONS") is None and full.find("PERMISSIONS") is not None
    assert [e.tag for e in short.find("HISTORY_RECORDS/HISTORY")] == [
        "OID", "SEQ", "HOSTNAME", "HID", "CID", "DS_ID", "VM_MAD", "TM_MAD", "ACTION"]
    assert [e.tag for e in full][:8] == ["ID", "UID", "GID", "UNAME", "GNAME", "NAME", "PERMISSIONS", "LAST_POLL"]
    host = ET.fromstring(proxy.one.host.info(lab.session, 0)[1])
    assert [e.tag for e in host] == ["ID", "NAME", "STATE", "PREV_STATE", "IM_MAD", "VM_MAD", "CLUSTER_ID",
                                     "CLUSTER", "HOST_SHARE", "VMS", "TEMPLATE", "MONITORING"]


def test_datastores_system_version_config(one: Any) -> None:
    pool = one.datastorepool.info()
    by_id = {int(d.ID): d for d in pool.DATASTORE}
    assert int(by_id[0].TYPE) == 1 and by_id[0].TEMPLATE["SHARED"] == "YES"
    assert int(by_id[101].TYPE) == 1 and by_id[101].TEMPLATE["SHARED"] == "NO"
    assert [int(c) for c in by_id[101].CLUSTERS.ID] == [1]
    assert isinstance(one.system.version(), str)
    assert one.system.config() is not None


def test_actions_and_state_rules(one: Any, lab: LabCloud) -> None:
    vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "SUSPENDED"})
    with pytest.raises(pyone.OneActionException):
        one.vm.action("resched", vid)  # oned: resched never from SUSPENDED
    assert one.vm.action("resume", vid) == vid
    wait_until(lambda: int(one.vm.info(vid).LCM_STATE) == LcmState.RUNNING, 5, what="resumed")
    assert one.vm.action("poweroff", vid) == vid
    wait_until(lambda: int(one.vm.info(vid).STATE) == VmState.POWEROFF, 5, what="poweroff")
    # unresched first: after resched the scheduler may move the VM (PROLOG_MIGRATE_POWEROFF) before a second call
    assert one.vm.action("unresched", vid) == vid
    assert one.vm.action("resched", vid) == vid  # allowed from POWEROFF
    # the scheduler moves it (PROLOG_MIGRATE_POWEROFF, where terminate is refused) and clears RESCHED when done
    wait_until(lambda: (vm := one.vm.info(vid)) and int(vm.STATE) == VmState.POWEROFF and int(vm.RESCHED) == 0,
               5, what="migrated while powered off")
    one.vm.action("terminate-hard", vid)
    wait_until(lambda: int(one.vm.info(vid).STATE) == VmState.DONE, 5, what="done")
    with pytest.raises(pyone.OneActionException):
        one.vm.action("resume", vid)


def test_hold_release_deploy_migrate(one: Any, lab: LabCloud) -> None:
    vid = call(lab.rpc_url, "lab.vm.create", {"STATE": "HOLD", "NAME": "held"})
    assert int(one.vm.info(vid).STATE) == VmState.HOLD
    one.vm.deploy(vid, 2)
    wait_until(lambda: int(one.vm.info(vid).LCM_STATE) == LcmState.RUNNING, 5, what="deployed")
    assert int(one.vm.info(vid).HISTORY_RECORDS.HISTORY[-1].HID) == 2
    one.vm.migrate(vid, 0, True)  # live, hosts 2 and 0 are both in cluster 0
    wait_until(lambda: int(one.vm.info(vid).HISTORY_RECORDS.HISTORY[-1].HID) == 0
               and int(one.vm.info(vid).LCM_STATE) == LcmState.RUNNING, 5, what="migrated")
    assert call(lab.rpc_url, "lab.oracle")["running"][str(vid)] == [0]
    one.vm.action("terminate", vid)


def test_host_status(one: Any) -> None:
    assert one.host.status(3, 1) == 3
    assert int(one.host.info(3).STATE) == HostState.DISABLED
    one.host.status(3, 2)
    assert int(one.host.info(3).STATE) == HostState.OFFLINE
    one.host.status(3, 0)  # from OFFLINE: INIT when the call returns (tests/test_lab_hoststatus.py, on a held clock),
    # MONITORED once the host answers its probe (the next tick here)
    wait_until(lambda: int(one.host.info(3).STATE) == HostState.MONITORED, 5, what="host 3 monitored again")
    with pytest.raises(pyone.OneInternalException):  # HostAPI.cc: INTERNAL "Wrong status code"
        one.host.status(3, 7)


def test_each_error_code_maps_to_its_pyone_exception(lab: LabCloud, one: Any) -> None:
    with pytest.raises(pyone.OneAuthenticationException):
        pyone.OneServer(lab.rpc_url, session="oneadmin:wrong").hostpool.info()
    with pytest.raises(pyone.OneNoExistsException):
        one.vm.info(424242)
    with pytest.raises(pyone.OneNoExistsException):
        one.host.info(999)
    with pytest.raises(pyone.OneNoExistsException):
        one.vm.recover(424242, 4)
    with pytest.raises(pyone.OneActionException):
        one.vm.action("release", 0)  # not on HOLD
    with pytest.raises(pyone.OneApiException):
        one.vm.info("zero")
    with pytest.raises(pyone.OneActionException):
        one.vm.recover(0, 9)  # oned: "Wrong recovery operation code", ACTION
    with pytest.raises(pyone.OneActionException):
        one.vm.action("explode", 0)  # oned: action "explode" is not supported, ACTION
    call(lab.rpc_url, "lab.faults", {"error_rate": 1.0})
    try:
        with pytest.raises(pyone.OneInternalException):
            one.hostpool.info()
    finally:
        call(lab.rpc_url, "lab.faults", {"error_rate": 0.0})


def test_malformed_calls_get_oned_errors_and_the_server_survives(lab: LabCloud) -> None:
    proxy = raw(lab)
    s = lab.session
    cases = [
        proxy.one.vm.info(s),  # missing argument
        proxy.one.vm.info(s, "1"),  # wrong type
        proxy.one.vm.info(s, True),  # bool is not an int in XML-RPC
        proxy.one.vm.action(s, 1, "resched"),  # arguments swapped
        proxy.one.vmpool.info(s, -2, -1, -1),  # pyone has no defaults: three of four
        proxy.one.vm.recover(s, 0, 4, 5, 6),  # too many
        proxy.one.vmpool.infoset(s, "1,x", False),  # bad id set
        proxy.lab.vm.create(s, {"USER_TEMPLATE": "not a struct"}),
        proxy.one.vm.info(),  # no session at all
        proxy.lab.vm.create(s, {"STATE": "FLYING"}),
        proxy.lab.faults(s, {"latency_ms": "slow"}),
        proxy.one.vm.info(s, [1]),
        proxy.one.vm.info(s, {"a": 1}),
    ]
    for reply in cases:
        assert reply[0] is False and reply[2] == 0x1000, reply
        assert isinstance(reply[1], str) and reply[1].startswith("[")
        assert isinstance(reply[3], int)
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.one.nonexistent.method(s)
    assert fault.value.faultCode == -506
    assert proxy.one.system.version(s)[0] is True  # still answering


def test_wrong_session_reply_shape(lab: LabCloud) -> None:
    reply = raw(lab).one.vm.info("oneadmin:nope", 0)
    assert reply[0] is False and reply[2] == 0x100 and isinstance(reply[3], int)
    assert raw(lab).lab.oracle("oneadmin:nope")[2] == 0x100


def test_faults_latency_hang_and_stats(lab: LabCloud, one: Any) -> None:
    import threading

    call(lab.rpc_url, "lab.stats", True)
    knobs = call(lab.rpc_url, "lab.faults", {"hang": True})
    assert knobs["hang"] is True
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(one.system.version())) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: call(lab.rpc_url, "lab.stats")["in_flight"] == 3, 5, what="3 calls hung")
    assert results == []
    call(lab.rpc_url, "lab.faults", {"hang": False, "latency_ms": 20})
    for t in threads:
        t.join(5)
    assert len(results) == 3
    call(lab.rpc_url, "lab.faults", {"latency_ms": 0})
    stats = call(lab.rpc_url, "lab.stats")
    assert stats["max_concurrent"] == 3 and stats["calls"]["one.system.version"] == 3


def test_text_is_escaped(one: Any, lab: LabCloud) -> None:
    vid = call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "NAME": "a<b>&'c\"", "HA": "yes",
                                              "USER_TEMPLATE": {"NOTE": "<x>&amp;", "bad name": "dropped"}})
    vm = one.vm.info(vid)
    assert vm.NAME == "a<b>&'c\""
    assert vm.USER_TEMPLATE["NOTE"] == "<x>&amp;" and vm.USER_TEMPLATE["HA"] == "yes"
    assert "bad name" not in vm.USER_TEMPLATE
    assert one.vmpool.infoset(str(vid), False).VM[0].NAME == "a<b>&'c\""
    one.vm.action("terminate-hard", vid)
