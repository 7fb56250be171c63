"""The lab's model of `oneha agent` (lab/hostside.py): every lab host runs the agent's real core, ticked on the lab's
clock, with a watchdog model. A host cut off from its storage, or (isolation "fence") from every detector, resets
within the self-fence deadline and not before; storage-only rides out a management partition; a link that flaps
faster than loss_timeout_s never resets a host; a host that comes back into its partition does not reboot-loop."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from oneha.lab.cloud import Cloud
from oneha.lab.sim import LabCloud
from oneha.timing_rule import Heartbeat
from oneha.waiting import wait_until

hostside = pytest.importorskip("oneha.lab.hostside", reason="needs sushy-tools (the lab extra)")
HostSide, HostSideOptions, address = hostside.HostSide, hostside.HostSideOptions, hostside.address

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="the lab's BMCs need openssl")

BEAT, LOSS, WATCHDOG, REBOOT = 0.1, 0.5, 0.5, 1.0
DEADLINE = BEAT + LOSS + WATCHDOG  # 1.1 s
TICK = 0.05  # the hostside thread's period
SLACK = 0.6  # the hostside thread's ticks and this test's polling, on a loaded 2-core machine
STORAGE, MGMT_FENCE, MGMT_STORAGE_ONLY, FLAPPING = 0, 1, 2, 3


@pytest.fixture(scope="module")
def beacon() -> Iterator[tuple[str, int]]:
    """A detector's beacon port (contract point 3): a real listener that accepts and closes, as the detector's does
    (a beacon that stopped accepting would fill its backlog, and every host would lose its detector)."""
    stop = threading.Event()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        s.settimeout(0.05)

        def serve() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    s.accept()[0].close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield s.getsockname()
        stop.set()
        thread.join(5)


@pytest.fixture(scope="module")
def lab(beacon: tuple[str, int]) -> Iterator[tuple[Cloud, HostSide]]:
    # unprivileged ports: the model needs no root, and does not meet another lab's port 22 on this machine
    options = HostSideOptions(ssh_port=20022, libvirt_port=26509, bmc_port=20443, heartbeat_s=BEAT,
                              loss_timeout_s=LOSS, watchdog_timeout_s=WATCHDOG, reboot_s=REBOOT, flap_period_s=0.2,
                              detectors=[beacon], isolation_by_host={MGMT_STORAGE_ONLY: "storage-only"})
    with LabCloud(hosts=5, vms=10, host_side=options) as lab_cloud:
        assert lab_cloud.host_side is not None
        yield lab_cloud.cloud, lab_cloud.host_side


def heartbeat(side: HostSide, hid: int) -> Heartbeat:
    return Heartbeat.decode(side.heartbeat_path(hid).read_bytes())


def vms_run(cloud: Cloud, hid: int) -> bool:
    with cloud.lock:
        vms = sorted(cloud.hosts[hid].vm_ids)
        return bool(vms) and all(hid in cloud.running.get(v, ()) for v in vms)


def runs_nothing(cloud: Cloud, hid: int) -> bool:
    with cloud.lock:
        return not any(hid in hosts for hosts in cloud.running.values())


def armed(side: HostSide, hid: int) -> None:
    wait_until(lambda: heartbeat(side, hid).status == "armed", 5, what=f"host {hid} armed")


def sshd_answers(hid: int) -> bool:
    try:
        with socket.create_connection((address(hid), 20022), timeout=0.5) as conn:
            conn.settimeout(0.5)
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def test_heartbeats_are_the_agents_format_and_arm_once_a_detector_is_seen(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    armed(side, 4)
    hb = heartbeat(side, 4)
    assert hb.host == cloud.hosts[4].name and hb.proves_self_fence and hb.deadline_s == pytest.approx(DEADLINE)
    assert side.heartbeat_path(4).name == cloud.hosts[4].name


def test_storage_partition_self_fences_within_the_deadline_and_not_before(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    hid = STORAGE
    armed(side, hid)
    side.fail(hid, "storage_partition")
    with side.lock:
        last_write = side.hosts[hid].agent.last_write
    wait_until(lambda: runs_nothing(cloud, hid), DEADLINE + 2, interval_s=0.01, what="self-fence")
    stopped = time.monotonic()  # the lab's clock
    # the last pet came at most a beat (+ a tick) before loss_timeout_s ran out, the reset a watchdog timeout later
    assert last_write + LOSS + WATCHDOG - BEAT - TICK <= stopped <= last_write + DEADLINE + SLACK, stopped - last_write
    assert side.hosts[hid].resets == 1 and not sshd_answers(hid)  # rebooting
    wait_until(lambda: sshd_answers(hid), REBOOT + 2, what="back from the reboot")
    assert cloud.hosts[hid].power == "on" and runs_nothing(cloud, hid)  # up, with no domains
    # still cut off from its storage: the fresh agent never arms, so the host does not reboot-loop
    time.sleep(3 * DEADLINE)  # an observation window, not a synchronisation: nothing may happen during it
    assert side.hosts[hid].resets == 1 and not side.hosts[hid].agent.armed
    side.restore(hid)
    armed(side, hid)


def test_management_partition_self_fences_with_isolation_fence(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    hid = MGMT_FENCE
    armed(side, hid)
    assert vms_run(cloud, hid)
    failed = time.monotonic()
    side.fail(hid, "mgmt_partition")
    wait_until(lambda: runs_nothing(cloud, hid), DEADLINE + 2, interval_s=0.01, what="self-fence")
    # the last detector contact was at most a beat (+ a tick) before the partition
    assert LOSS + WATCHDOG - 2 * (BEAT + TICK) <= time.monotonic() - failed <= DEADLINE + SLACK
    # back from the reboot into the same partition: it writes its heartbeat again, unarmed (no detector seen)
    wait_until(lambda: heartbeat(side, hid).status == "unarmed", REBOOT + 2, what="unarmed heartbeat")
    assert side.hosts[hid].resets == 1 and cloud.hosts[hid].power != "on" and runs_nothing(cloud, hid)
    side.restore(hid)


def test_management_partition_storage_only_keeps_running(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    hid = MGMT_STORAGE_ONLY
    armed(side, hid)
    assert heartbeat(side, hid).isolation == "storage-only"
    side.fail(hid, "mgmt_partition")
    seq = heartbeat(side, hid).seq
    time.sleep(3 * DEADLINE)  # observation window: the host must ride it out
    assert vms_run(cloud, hid) and side.hosts[hid].resets == 0
    hb = heartbeat(side, hid)
    assert hb.seq > seq and hb.status == "armed"  # still beating, still promising
    side.restore(hid)


def test_flapping_shorter_than_loss_timeout_never_resets(lab: tuple[Cloud, HostSide]) -> None:
    cloud, side = lab
    hid = FLAPPING
    armed(side, hid)
    side.fail(hid, "flapping")  # down 0.2 s, up 0.2 s: never LOSS (0.5 s) without a detector
    time.sleep(5 * DEADLINE)  # observation window
    assert vms_run(cloud, hid) and side.hosts[hid].resets == 0
    side.restore(hid)
