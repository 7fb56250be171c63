"""The lab's one_hm-style events, received by a real pyzmq SUB socket."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from typing import Any

import zmq

from oneha.opennebula import HostEvent, HostState, LcmState, VmEvent, VmState, decode_event
from oneha.waiting import wait_until
from tests.labkit import call, running_lab, subscriber, sync_subscriber


def collect(sock: zmq.Socket[bytes], until: Any, timeout_s: float = 5.0) -> list[tuple[bytes, bytes]]:
    """Receive messages until `until(messages)` is true."""
    got: list[tuple[bytes, bytes]] = []

    def more() -> bool:
        while sock.poll(10):
            key, content = sock.recv_multipart()
            got.append((key, content))
        return bool(until(got))

    wait_until(more, timeout_s, interval_s=0.01, what="events")
    return got


def test_host_error_then_vm_unknown_with_both_key_forms() -> None:
    with running_lab(hosts=2, vms=4) as lab, subscriber(lab.events_url) as sock:
        sync_subscriber(sock, lab.rpc_url)
        call(lab.rpc_url, "lab.host.kill", 1)
        keys_wanted = {b"EVENT STATE HOST/ERROR//1 ", b"EVENT HOST 1/ERROR/ ",
                       b"EVENT STATE VM/ACTIVE/UNKNOWN/1 ", b"EVENT VM 1/ACTIVE/UNKNOWN ",
                       b"EVENT STATE VM/ACTIVE/UNKNOWN/3 ", b"EVENT VM 3/ACTIVE/UNKNOWN "}
        got = collect(sock, lambda msgs: keys_wanted <= {k for k, _ in msgs})
        keys = [k for k, _ in got]
        assert keys.index(b"EVENT STATE HOST/ERROR//1 ") < keys.index(b"EVENT STATE VM/ACTIVE/UNKNOWN/1 ")

        host_msg = dict(got)[b"EVENT STATE HOST/ERROR//1 "]
        assert b"\n" not in host_msg  # one line, as oned encodes
        root = ET.fromstring(base64.b64decode(host_msg))
        assert [e.tag for e in root] == ["HOOK_TYPE", "HOOK_OBJECT", "STATE", "REMOTE_HOST", "RESOURCE_ID", "HOST"]
        assert (root.findtext("HOOK_TYPE"), root.findtext("HOOK_OBJECT"), root.findtext("STATE")) == (
            "STATE", "HOST", "ERROR")
        assert root.findtext("REMOTE_HOST") == "host0001" and root.findtext("RESOURCE_ID") == "1"
        assert root.findtext("HOST/STATE") == str(int(HostState.ERROR))  # a number inside
        assert sorted(e.text or "" for e in root.findall("HOST/VMS/ID")) == ["1", "3"]
        assert root.findtext("HOST/TEMPLATE/FENCE_IP") == "10.1.0.2"
        assert dict(got)[b"EVENT HOST 1/ERROR/ "] == host_msg

        vm_msg = dict(got)[b"EVENT VM 3/ACTIVE/UNKNOWN "]
        vroot = ET.fromstring(base64.b64decode(vm_msg))
        assert [e.tag for e in vroot] == ["HOOK_TYPE", "HOOK_OBJECT", "STATE", "LCM_STATE", "RESOURCE_ID",
                                          "REMOTE_HOST", "VM"]
        assert (vroot.findtext("STATE"), vroot.findtext("LCM_STATE"), vroot.findtext("RESOURCE_ID")) == (
            "ACTIVE", "UNKNOWN", "3")
        assert vroot.findtext("REMOTE_HOST") == "host0001"
        assert vroot.findtext("VM/STATE") == "3" and vroot.findtext("VM/LCM_STATE") == "16"
        assert vroot.findtext("VM/HISTORY_RECORDS/HISTORY/HOSTNAME") == "host0001"

        # Cross-check with the project's decoder.
        host_event = decode_event(b"EVENT STATE HOST/ERROR//1 ", host_msg)
        assert isinstance(host_event, HostEvent) and host_event.state == HostState.ERROR
        assert host_event.host is not None and host_event.host.vm_ids == (1, 3)
        vm_event = decode_event(b"EVENT VM 3/ACTIVE/UNKNOWN ", vm_msg)
        assert isinstance(vm_event, VmEvent) and vm_event.lcm_state == LcmState.UNKNOWN
        assert vm_event.vm is not None and vm_event.vm.hid == 1


def test_non_active_vm_states_use_lcm_init_and_prefix_filtering() -> None:
    with running_lab(hosts=2, vms=2) as lab, subscriber(lab.events_url, b"EVENT STATE VM/", b"EVENT VM 0/") as sock:
        sync_subscriber(sock, lab.rpc_url)
        call(lab.rpc_url, "one.vm.action", "poweroff", 0)
        got = collect(sock, lambda msgs: any(k == b"EVENT VM 0/POWEROFF/LCM_INIT " for k, _ in msgs))
        keys = [k for k, _ in got]
        assert b"EVENT STATE VM/ACTIVE/SHUTDOWN_POWEROFF/0 " in keys
        assert b"EVENT STATE VM/POWEROFF/LCM_INIT/0 " in keys
        assert not any(k.startswith(b"EVENT HOST") for k in keys)
        event = decode_event(b"EVENT STATE VM/POWEROFF/LCM_INIT/0 ", dict(got)[b"EVENT STATE VM/POWEROFF/LCM_INIT/0 "])
        assert isinstance(event, VmEvent) and event.state == VmState.POWEROFF


def test_pending_vm_event_has_empty_remote_host_and_recovery_events() -> None:
    with running_lab(hosts=2, vms=0) as lab, subscriber(lab.events_url, b"EVENT STATE ") as sock:
        sync_subscriber(sock, lab.rpc_url)
        vid = call(lab.rpc_url, "lab.vm.create", {"STATE": "PENDING"})
        names = [f"EVENT STATE VM/{s}/{vid} ".encode() for s in
                 ("PENDING/LCM_INIT", "ACTIVE/PROLOG", "ACTIVE/BOOT", "ACTIVE/RUNNING")]
        got = collect(sock, lambda msgs: names[-1] in {k for k, _ in msgs})
        keys = [k for k, _ in got if k.endswith(f"/{vid} ".encode())]
        assert keys == names
        pending = ET.fromstring(base64.b64decode(dict(got)[names[0]]))
        assert pending.find("REMOTE_HOST") is not None and pending.findtext("REMOTE_HOST") in (None, "")


def test_event_drop_rate_drops_events() -> None:
    with running_lab(hosts=2, vms=0) as lab, subscriber(lab.events_url) as sock:
        sync_subscriber(sock, lab.rpc_url)
        call(lab.rpc_url, "lab.faults", {"event_drop_rate": 1.0})
        call(lab.rpc_url, "lab.vm.create", {"STATE": "HOLD"})
        call(lab.rpc_url, "lab.faults", {"event_drop_rate": 0.0})
        marker = call(lab.rpc_url, "lab.vm.create", {"STATE": "HOLD"})
        got = collect(sock, lambda msgs: any(k.endswith(f"/{marker} ".encode()) for k, _ in msgs))
        assert all(k.endswith(f"/{marker} ".encode()) or k.endswith(f"{marker}/HOLD/LCM_INIT ".encode())
                   for k, _ in got), [k for k, _ in got]
        assert call(lab.rpc_url, "lab.stats")["events_dropped"] == 1
