"""Helpers for the subscriber tests: hand-built one_hm messages (independent of the project's parser and of the
lab's writer), a test PUB socket, settings and a running service. Plus checks of the helpers themselves."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any

import redis
import zmq
from prometheus_client import REGISTRY

from oneha.incidents import Incident, IncidentStore
from oneha.settings import Settings
from oneha.subscriber.service import Service
from oneha.waiting import wait_until


def host_xml(hid: int, state: int, cluster: int = 0, vms: tuple[int, ...] = ()) -> str:
    ids = "".join(f"<ID>{v}</ID>" for v in vms)
    return (f"<HOST><ID>{hid}</ID><NAME>host{hid:04d}</NAME><STATE>{state}</STATE><CLUSTER_ID>{cluster}</CLUSTER_ID>"
            f"<VMS>{ids}</VMS><TEMPLATE><FENCE_IP>10.0.0.{hid}</FENCE_IP></TEMPLATE></HOST>")


def vm_xml(vid: int, state: int, lcm: int, hid: int = 0, cluster: int = 0, seq: int = 0,
           user: dict[str, str] | None = None) -> str:
    tmpl = "".join(f"<{k}>{v}</{k}>" for k, v in (user or {}).items())
    return (f"<VM><ID>{vid}</ID><NAME>vm{vid}</NAME><STATE>{state}</STATE><LCM_STATE>{lcm}</LCM_STATE>"
            f"<RESCHED>0</RESCHED><USER_TEMPLATE>{tmpl}</USER_TEMPLATE><HISTORY_RECORDS><HISTORY><SEQ>{seq}</SEQ>"
            f"<HOSTNAME>host{hid:04d}</HOSTNAME><HID>{hid}</HID><CID>{cluster}</CID><DS_ID>0</DS_ID></HISTORY>"
            "</HISTORY_RECORDS></VM>")


def host_message(hid: int, state_name: str, state: int, cluster: int = 0) -> tuple[bytes, bytes]:
    doc = (f"<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>HOST</HOOK_OBJECT><STATE>{state_name}</STATE>"
           f"<REMOTE_HOST>host{hid:04d}</REMOTE_HOST><RESOURCE_ID>{hid}</RESOURCE_ID>"
           f"{host_xml(hid, state, cluster)}</HOOK_MESSAGE>")
    return f"EVENT STATE HOST/{state_name}//{hid} ".encode(), base64.b64encode(doc.encode())


def host_message_object_form(hid: int, state_name: str, state: int, cluster: int = 0) -> tuple[bytes, bytes]:
    _, content = host_message(hid, state_name, state, cluster)
    return f"EVENT HOST {hid}/{state_name}/ ".encode(), content


def vm_message(vid: int, lcm_name: str, lcm: int, hid: int = 0, cluster: int = 0, seq: int = 0,
               user: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    doc = (f"<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>VM</HOOK_OBJECT><STATE>ACTIVE</STATE>"
           f"<LCM_STATE>{lcm_name}</LCM_STATE><RESOURCE_ID>{vid}</RESOURCE_ID><REMOTE_HOST>host{hid:04d}</REMOTE_HOST>"
           f"{vm_xml(vid, 3, lcm, hid, cluster, seq, user)}</HOOK_MESSAGE>")
    return f"EVENT STATE VM/ACTIVE/{lcm_name}/{vid} ".encode(), base64.b64encode(doc.encode())


@contextlib.contextmanager
def publisher(kind: int = zmq.PUB, sndhwm: int = 0) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close()


def settings(redis_url: str, endpoints: list[str] | None = None, rpc_url: str = "http://127.0.0.1:9/RPC2",
             session: str = "oneadmin:opennebula", **policy: Any) -> Settings:
    sub = {"zmq_endpoints": endpoints or ["tcp://127.0.0.1:9"], "reconcile_interval_s": 0.5,
           "full_scan_interval_s": 2.0, "dispatch_interval_s": 0.1, "metrics_port": None}
    pol = {"host_grace_s": 0.0, "fencing": "none", **policy}
    return Settings(redis={"url": redis_url}, oned={"endpoint": rpc_url, "session": session,
                                                   "connect_timeout_s": 1.0, "read_timeout_s": 3.0},
                    subscriber=sub, policy={"default": pol})


@contextlib.contextmanager
def running(s: Settings, components: tuple[str, ...] = ("zmq",)) -> Iterator[Service]:
    svc = Service(s, components=components).start()
    try:
        yield svc
    finally:
        svc.stop()


def sync(sock: zmq.Socket[bytes], svc: Service, timeout_s: float = 10.0) -> None:
    """Publish a harmless host event until the service's listener has received something: PUB/SUB drops what is
    sent before the subscription reaches the publisher."""
    key, content = host_message(999_999, "DISABLED", 4)
    start = svc.listener.received

    def landed() -> bool:
        sock.send_multipart([key, content])
        return svc.listener.received > start

    wait_until(landed, timeout_s, interval_s=0.02, max_interval_s=0.05, what="subscription")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def incidents(url: str) -> list[Incident]:
    """Every incident in Redis, oldest first."""
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return list(reversed(IncidentStore(r).recent(10_000)))
    finally:
        r.close()


def test_hand_built_messages_decode_as_oned_ones() -> None:
    from oneha.opennebula import HostEvent, HostState, LcmState, VmEvent, decode_event

    ev = decode_event(*host_message(3, "ERROR", 3, cluster=7))
    assert isinstance(ev, HostEvent) and ev.state == HostState.ERROR and ev.host and ev.host.cluster_id == 7
    ev2 = decode_event(*host_message_object_form(3, "ERROR", 3))
    assert isinstance(ev2, HostEvent) and ev2.host_id == 3
    vm = decode_event(*vm_message(42, "UNKNOWN", 16, hid=3, cluster=2, seq=5, user={"HA": "NO"}))
    assert isinstance(vm, VmEvent) and vm.lcm_state == LcmState.UNKNOWN
    assert vm.vm is not None and vm.vm.cluster_id == 2 and vm.vm.history_seq == 5 and vm.vm.ha_opt_out
