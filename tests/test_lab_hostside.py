"""The lab's host side (lab/hostside.py): every failure mode shows on every signal as it would on real hardware, and
deploy/fence/fence_redfish.sh fences a lab host through its lab BMC (sushy-tools' Redfish emulator)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from oneha.lab.cli import LabCallError, lab_call
from oneha.lab.cloud import Cloud
from oneha.lab.sim import LabCloud
from oneha.timing_rule import Heartbeat
from oneha.waiting import wait_until

hostside = pytest.importorskip("oneha.lab.hostside", reason="needs sushy-tools (the lab extra)")
HostSide, HostSideOptions, address = hostside.HostSide, hostside.HostSideOptions, hostside.address

FENCE_REDFISH = Path(__file__).resolve().parent.parent / "deploy" / "fence" / "fence_redfish.sh"
HEARTBEAT_S = 0.2
MODES = {  # mode -> host id
    "psu": 0, "power_loss": 1, "kernel_hang": 2, "mgmt_partition": 3, "storage_partition": 4, "flapping": 5,
}
PARTITION_NO_BMC, FENCE_ME, FENCE_DEAD_BMC, BY_RPC = 6, 7, 8, 9




WHY_NOT = pytest.importorskip("oneha.lab.detection").unavailable()  # ports 22/443/16509 on 127.50.x.y, openssl
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def lab_cloud() -> Iterator[LabCloud]:
    options = HostSideOptions(bmc_delay_s=(0.5, 1.0), heartbeat_s=HEARTBEAT_S, flap_period_s=0.6)
    with LabCloud(hosts=10, vms=20, host_side=options) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab(lab_cloud: LabCloud) -> tuple[Cloud, HostSide]:
    assert lab_cloud.host_side is not None
    return lab_cloud.cloud, lab_cloud.host_side


def tcp(hid: int, port: int) -> str:
    """answers (banner or an orderly close), silent (connected, nothing comes), or refused."""
    try:
        conn = socket.create_connection((address(hid), port), timeout=1.0)
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener closed during the handshake
        return "refused"
    except TimeoutError:
        return "silent"
    with conn:
        conn.settimeout(0.5)
        try:
            conn.recv(64)
        except TimeoutError:
            return "silent"
        except ConnectionResetError:
            return "refused"  # the listener closed while this connection waited in its backlog
    return "answers"


def bmc(side: HostSide, hid: int) -> str:
    """The PowerState the host's BMC reports, or "down"."""
    sig = side.hosts[hid]
    try:
        reply = requests.get(f"https://{address(hid)}/redfish/v1/Systems/{sig.uuid}", timeout=3,
                             auth=(side.o.bmc_user, side.password), verify=str(side.cacert))
    except requests.ConnectionError:
        return "down"
    reply.raise_for_status()
    return str(reply.json()["PowerState"])


def beats(side: HostSide, hid: int) -> bool:
    """True when the heartbeat file (`<heartbeat_dir>/<host NAME>`, oneha/timing_rule.py's format) gets a new seq
    within a few periods."""
    path = side.heartbeat_dir / side.names[hid]
    before = Heartbeat.decode(path.read_bytes())
    assert before.host == side.names[hid]
    try:
        wait_until(lambda: Heartbeat.decode(path.read_bytes()).seq != before.seq, 4 * HEARTBEAT_S, what="heartbeat")
    except TimeoutError:
        return False
    return True


def vms_run(cloud: Cloud, hid: int) -> bool:
    with cloud.lock:
        vms = sorted(cloud.hosts[hid].vm_ids)
        return all(hid in cloud.running.get(v, ()) for v in vms)


def signals(cloud: Cloud, side: HostSide, hid: int) -> dict[str, object]:
    return {"ssh": tcp(hid, 22), "libvirtd": tcp(hid, 16509), "bmc": bmc(side, hid), "heartbeat": beats(side, hid),
            "front-end reaches it": cloud.hosts[hid].power == "on", "VMs run": vms_run(cloud, hid)}


HEALTHY = {"ssh": "answers", "libvirtd": "answers", "bmc": "On", "heartbeat": True, "front-end reaches it": True,
           "VMs run": True}
EXPECTED = {
    "psu": {"ssh": "refused", "libvirtd": "refused", "bmc": "Off", "heartbeat": False,
            "front-end reaches it": False, "VMs run": False},
    "power_loss": {"ssh": "refused", "libvirtd": "refused", "bmc": "down", "heartbeat": False,
                   "front-end reaches it": False, "VMs run": False},
    "kernel_hang": {"ssh": "silent", "libvirtd": "silent", "bmc": "On", "heartbeat": False,
                    "front-end reaches it": False, "VMs run": False},
    "mgmt_partition": {"ssh": "refused", "libvirtd": "refused", "bmc": "On", "heartbeat": True,
                       "front-end reaches it": False, "VMs run": True},
    "storage_partition": {"ssh": "answers", "libvirtd": "answers", "bmc": "On", "heartbeat": False,
                          "front-end reaches it": True, "VMs run": True},
}


def test_every_host_has_its_own_address_and_answers_when_healthy(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    assert signals(cloud, side, FENCE_ME) == HEALTHY
    assert cloud.hosts[FENCE_ME].template["FENCE_IP"] == address(FENCE_ME) == "127.50.0.8"
    other = side.hosts[0].uuid  # a BMC shows only its own system
    reply = requests.get(f"https://{address(FENCE_ME)}/redfish/v1/Systems/{other}", timeout=3,
                         auth=(side.o.bmc_user, side.password), verify=str(side.cacert))
    assert reply.status_code == 404
    reply = requests.get(f"https://{address(FENCE_ME)}/redfish/v1/Systems/{side.hosts[FENCE_ME].uuid}", timeout=3,
                         auth=(side.o.bmc_user, "wrong"), verify=str(side.cacert))
    assert reply.status_code == 401


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_failure_mode_shows_on_each_signal(lab: tuple[Cloud, HostSide], mode: str) -> None:
    cloud, side = lab
    hid = MODES[mode]
    side.fail(hid, mode)
    wait_until(lambda: tcp(hid, 22) == EXPECTED[mode]["ssh"], 5, what=f"{mode}: sshd")
    assert signals(cloud, side, hid) == EXPECTED[mode]
    for other in (FENCE_ME,):  # nothing leaks onto another host's address
        assert tcp(other, 22) == "answers"


def test_partition_with_an_unreachable_bmc(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    side.fail(PARTITION_NO_BMC, "mgmt_partition", bmc_reachable=False)
    wait_until(lambda: tcp(PARTITION_NO_BMC, 22) == "refused", 5, what="sshd refused")
    assert signals(cloud, side, PARTITION_NO_BMC) == {**EXPECTED["mgmt_partition"], "bmc": "down"}


def test_a_flapping_management_link_comes_and_goes(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    hid = MODES["flapping"]
    side.fail(hid, "flapping")
    ssh: set[str] = set()
    reached: set[bool] = set()
    deadline = time.monotonic() + 5
    while (len(ssh) < 2 or len(reached) < 2) and time.monotonic() < deadline:
        ssh.add(tcp(hid, 22))
        reached.add(cloud.hosts[hid].power == "on")
        time.sleep(0.05)
    assert ssh == {"answers", "refused"} and reached == {True, False}
    assert beats(side, hid) and vms_run(cloud, hid) and bmc(side, hid) == "On"
    side.restore(hid)
    wait_until(lambda: tcp(hid, 22) == "answers", 5, what="link back")
    assert signals(cloud, side, hid) == HEALTHY


def fence(cloud: Cloud, side: HostSide, hid: int) -> subprocess.CompletedProcess[bytes]:
    with cloud.lock:
        xml = cloud.xml.host_xml(cloud, cloud.hosts[hid])
    env = {"PATH": os.environ["PATH"], "ONEHA_FENCE_CRED_DIR": str(side.cred_dir), "ONEHA_FENCE_POLL_S": "0.2",
           "ONEHA_FENCE_DEADLINE_S": "10"}
    return subprocess.run(["bash", str(FENCE_REDFISH)], input=base64.b64encode(xml.encode()), env=env,
                          capture_output=True, timeout=30, check=False)


def test_fence_redfish_powers_a_partitioned_lab_host_off_through_its_bmc(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    side.fail(FENCE_ME, "mgmt_partition")
    assert vms_run(cloud, FENCE_ME)  # a split brain waiting to happen
    started = time.monotonic()
    proc = fence(cloud, side, FENCE_ME)
    assert proc.returncode == 0, proc.stderr.decode()
    assert time.monotonic() - started >= side.o.bmc_delay_s[0]  # the BMC took its time
    assert bmc(side, FENCE_ME) == "Off" and not vms_run(cloud, FENCE_ME) and cloud.hosts[FENCE_ME].power == "off"
    assert not beats(side, FENCE_ME)


def test_fence_redfish_fails_closed_when_the_bmc_is_dead_too(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    side.fail(FENCE_DEAD_BMC, "power_loss")
    wait_until(lambda: bmc(side, FENCE_DEAD_BMC) == "down", 5, what="BMC down")
    proc = fence(cloud, side, FENCE_DEAD_BMC)
    assert proc.returncode != 0


def test_failure_modes_over_the_lab_rpc(lab_cloud: LabCloud) -> None:
    cloud, side = lab_cloud.cloud, lab_cloud.host_side
    assert side is not None
    assert lab_call(lab_cloud.rpc_url, "lab.host.fail", BY_RPC, "mgmt_partition", False) == BY_RPC
    wait_until(lambda: tcp(BY_RPC, 22) == "refused", 5, what="partitioned")
    assert signals(cloud, side, BY_RPC) == {**EXPECTED["mgmt_partition"], "bmc": "down"}
    assert lab_call(lab_cloud.rpc_url, "lab.host.restore", BY_RPC) == BY_RPC
    wait_until(lambda: tcp(BY_RPC, 22) == "answers", 5, what="restored")
    assert signals(cloud, side, BY_RPC) == HEALTHY
    with pytest.raises(LabCallError, match="unknown failure mode"):
        lab_call(lab_cloud.rpc_url, "lab.host.fail", BY_RPC, "meteor")
    with pytest.raises(LabCallError, match="host"):
        lab_call(lab_cloud.rpc_url, "lab.host.fail", 99, "psu")


def test_lab_host_fail_needs_a_host_side() -> None:
    with LabCloud(hosts=1) as lab, pytest.raises(LabCallError, match="without a host side"):
        lab_call(lab.rpc_url, "lab.host.fail", 0, "psu")


def test_a_blocked_source_gets_no_answer_from_any_host(lab: tuple[Cloud, HostSide]) -> None:
    """block_source cuts one prober (a detector's own address) off every host; the others still get answers."""
    _, side = lab
    blocked = "127.0.0.77"

    def banner(source: str) -> bytes:
        try:  # the reset may come while connect() still runs (a busy machine) or at the first read
            with socket.create_connection((address(BY_RPC), 22), timeout=1.0, source_address=(source, 0)) as conn:
                conn.settimeout(1.0)
                return conn.recv(64)
        except ConnectionResetError:
            return b""

    side.block_source(blocked)
    try:
        assert banner(blocked) == b"" and banner("127.0.0.78").startswith(b"SSH-")
    finally:
        side.block_source(blocked, blocked=False)
    assert banner(blocked).startswith(b"SSH-")
