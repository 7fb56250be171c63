"""`oneha agent` (oneha/agent/): the core's decisions on a fake clock, the heartbeat format's guarantee, the bounded
writer against a real directory and a FIFO that hangs, the detector probe against real sockets, the watchdog against
a fake device file, the start-up refusal, and the command as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oneha.agent import watchdog as wd
from oneha.agent.core import AgentCore
from oneha.agent.heartbeat import HeartbeatWriter, atomic_write, read_bounded
from oneha.agent.visibility import any_accepts
from oneha.settings import ConfigError, load_settings, parse_endpoint
from oneha.timing_rule import AgentTiming, Heartbeat, detector_document, fits
from oneha.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMING = AgentTiming(beat_interval_s=1.0, loss_timeout_s=10.0, watchdog_timeout_s=10.0)


def core(isolation: str = "fence", watchdog: bool = True) -> AgentCore:
    return AgentCore("host7", "boot-1", TIMING, isolation, watchdog)  # type: ignore[arg-type]


# --- the core -----------------------------------------------------------------------------------------------------

def test_arms_only_once_storage_and_a_detector_were_seen() -> None:
    c = core()
    c.wrote(0.0)
    first = c.beat(0.5)
    assert not first.arm and not first.pet and "every detector (never seen)" in first.reason
    assert c.next_heartbeat().status == "unarmed"  # a host booting into a partition promises nothing
    c.saw_detector(1.0)
    second = c.beat(1.1)
    assert second.arm and second.pet
    c.armed_now()
    assert c.next_heartbeat().status == "armed"


def test_a_host_that_never_sees_its_storage_never_arms() -> None:
    c = core()
    for t in range(100):
        c.saw_detector(float(t))
        assert not c.beat(float(t)).arm


def test_pets_only_while_both_are_younger_than_loss_timeout() -> None:
    c = core()
    c.wrote(0.0)
    c.saw_detector(0.0)
    c.beat(0.0)
    c.armed_now()
    assert c.beat(9.999).pet
    assert not c.beat(10.0).pet  # "younger than": at exactly loss_timeout_s the pet stops
    c.wrote(5.0)
    assert not c.beat(10.0).pet  # the detector is as old as before
    c.saw_detector(5.0)
    assert c.beat(10.0).pet and not c.beat(10.0).arm
    assert "NOT PETTING: lost storage (10.0 s ago)" in c.beat(15.0).reason


def test_storage_only_ignores_the_detectors_for_arming_and_petting() -> None:
    c = core("storage-only")
    c.wrote(0.0)
    assert c.beat(1.0).arm
    c.armed_now()
    assert c.beat(9.0).pet and not c.beat(10.0).pet


def test_no_watchdog_never_arms_and_never_promises() -> None:
    c = core(watchdog=False)
    c.wrote(0.0)
    c.saw_detector(0.0)
    assert not c.beat(0.1).arm
    hb = c.next_heartbeat()
    assert hb.status == "no-watchdog" and not hb.proves_self_fence


def test_seq_changes_every_heartbeat_and_the_stop_one_promises_nothing() -> None:
    c = AgentCore("h", "b", TIMING, first_seq=41)
    assert [c.next_heartbeat().seq for _ in range(3)] == [42, 43, 44]
    c.armed = True
    final = c.stop()
    assert final.seq == 45 and final.status == "stopped" and not final.proves_self_fence
    assert not c.beat(0.0).pet


def test_the_reset_comes_within_the_published_deadline_of_the_last_write() -> None:
    """Beats on a fake clock, the storage lost at a random moment: the last pet + the watchdog timeout (the reset)
    is never later than the last successful write + the self-fence deadline, nor earlier than loss_timeout_s."""
    for offset in (0.0, 0.3, 0.99):
        c = AgentCore("h", "b", TIMING)
        t, loss_at, last_pet, last_ok = 0.0, 20.0 + offset, 0.0, 0.0
        while t < 60:
            if t < loss_at:
                c.wrote(t)
                last_ok = t
            c.saw_detector(t)
            d = c.beat(t + 0.2)  # the checks take time: the decision comes later in the beat
            if d.arm:
                c.armed_now()
            if d.pet:
                last_pet = t + 0.2
            t += TIMING.beat_interval_s
        reset = last_pet + TIMING.watchdog_timeout_s
        assert last_ok + TIMING.loss_timeout_s <= reset <= last_ok + TIMING.self_fence_deadline_s


# --- the heartbeat format (oneha/timing_rule.py) ---------------------------------------------------------------------

def test_only_an_armed_heartbeat_can_prove_a_self_fence() -> None:
    armed = Heartbeat("h", 1, "b", 21.0, "fence", "armed")
    assert Heartbeat.decode(armed.encode()) == armed and armed.proves_self_fence
    for status in ("unarmed", "no-watchdog", "stopped"):
        raw = Heartbeat("h", 2, "b", 21.0, "fence", status).encode()  # type: ignore[arg-type]
        assert json.loads(raw)["deadline_s"] is None
        back = Heartbeat.decode(raw)
        assert back.status == status and not back.proves_self_fence
        assert not fits(back.deadline_s, 10_000.0)  # a reader that forgot `status` cannot use it either
    first_format = b'{"v":1,"host":"h","seq":3,"boot":"b","deadline_s":21,"isolation":"fence"}'
    assert Heartbeat.decode(first_format).proves_self_fence
    for bad in (b'{"v":1,"host":"h","seq":3,"boot":"b","deadline_s":null,"status":"armed"}',
                b'{"v":1,"host":"h","seq":3,"boot":"b","deadline_s":21,"status":"maybe"}'):
        with pytest.raises(ValueError):
            Heartbeat.decode(bad)


# --- the heartbeat writer -------------------------------------------------------------------------------------------

def test_atomic_write_leaves_the_file_whole_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "host7"
    writer = HeartbeatWriter(path)
    for seq in range(5):
        assert writer.write(Heartbeat("host7", seq, "b", 21.0).encode(), float(seq), 2.0)
    assert Heartbeat.decode(path.read_bytes()).seq == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host7"]
    assert writer.last_success() == 4.0


def test_a_hanging_write_fails_in_bounded_time_and_never_piles_up(tmp_path: Path) -> None:
    """The temporary file is a FIFO with no reader: open() blocks, as a write on a hung NFS mount does."""
    path = tmp_path / "host7"
    fifo = tmp_path / ".host7.tmp"
    os.mkfifo(fifo)
    writer = HeartbeatWriter(path)
    started = time.monotonic()
    assert not writer.write(b"{}", 1.0, 0.2)
    assert time.monotonic() - started < 1.0 and writer.busy
    assert not writer.write(b"{}", 2.0, 0.2) and "not finished" in (writer.last_error or "")  # no second thread
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the storage answers again
    try:
        assert writer.wait(5.0)
    finally:
        os.close(reader)
    fifo.unlink(missing_ok=True)
    assert writer.last_success() is None  # fsync on a FIFO fails: that write did not succeed
    assert writer.write(b"{}", 3.0, 2.0) and writer.last_success() == 3.0


def test_a_late_write_counts_from_its_start(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(path: Path, data: bytes) -> None:
        release.wait(5)
        atomic_write(path, data)

    writer = HeartbeatWriter(tmp_path / "h", write=slow)
    assert not writer.write(b"{}", 7.0, 0.05)
    release.set()
    assert writer.wait(5.0) and writer.last_success() == 7.0


def test_read_bounded(tmp_path: Path) -> None:
    assert read_bounded(tmp_path / "absent", 1.0, 100) is None
    (tmp_path / "f").write_bytes(b"x" * 10)
    assert read_bounded(tmp_path / "f", 1.0, 100) == b"x" * 10
    os.mkfifo(tmp_path / "hang")
    with pytest.raises(OSError, match="longer than"):
        read_bounded(tmp_path / "hang", 0.1, 100)
    os.close(os.open(tmp_path / "hang", os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go


# --- detector visibility --------------------------------------------------------------------------------------------

@pytest.fixture()
def beacon() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s


def test_any_one_detector_accepting_is_enough(beacon: socket.socket) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    up = beacon.getsockname()
    assert any_accepts([dead, up], 1.0)
    beacon.accept()[0].close()
    assert not any_accepts([dead], 1.0)
    assert not any_accepts([], 1.0)
    assert any_accepts([up], 1.0, source="127.50.0.9")
    conn, peer = beacon.accept()
    conn.close()
    assert peer[0] == "127.50.0.9"  # seen from the host's own address (the lab uses it)


def test_a_hanging_detector_costs_at_most_the_timeout(beacon: socket.socket) -> None:
    """A listener whose backlog is full drops SYNs: the connection neither completes nor fails."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for f in fillers:
            f.setblocking(False)
            f.connect_ex(full.getsockname())
        try:
            started = time.monotonic()
            assert not any_accepts([full.getsockname()], 0.3)
            assert 0.25 < time.monotonic() - started < 1.0
            assert any_accepts([full.getsockname(), beacon.getsockname()], 0.3)
        finally:
            for f in fillers:
                f.close()


def test_detector_endpoints_are_ip_addresses() -> None:
    assert parse_endpoint("[::1]:9650") == ("::1", 9650)
    for bad in ("detector1:9650", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:http"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    with pytest.raises(ConfigError, match=r"agent\.detectors"):
        load_settings(agent={"detectors": ["det1.example:9650"]})


# --- the watchdog ---------------------------------------------------------------------------------------------------

def test_ioctl_numbers_are_the_kernels() -> None:
    # include/uapi/linux/watchdog.h: _IOWR('W', 6, int), _IOR('W', 7, int), _IOR('W', 0, struct watchdog_info)
    assert (wd.WDIOC_SETTIMEOUT, wd.WDIOC_GETTIMEOUT, wd.WDIOC_GETSUPPORT) == (0xC0045706, 0x80045707, 0x80285700)


class FakeDriver:
    def __init__(self, readback: int | None = None, identity: str = "iTCO_wdt") -> None:
        self.calls: list[tuple[int, int]] = []
        self.timeout, self.readback, self.identity = 60, readback, identity

    def __call__(self, fd: int, request: int, arg: bytes = b"") -> bytes:
        if request == wd.WDIOC_GETSUPPORT:
            return bytes(8) + self.identity.encode().ljust(32, b"\0")
        value = struct.unpack("i", arg)[0]
        self.calls.append((request, value))
        if request == wd.WDIOC_SETTIMEOUT:
            self.timeout = value
            return arg
        return struct.pack("i", self.readback if self.readback is not None else self.timeout)


def test_arm_sets_and_reads_back_the_timeout_pets_and_closes_with_v(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "watchdog"
    device.touch()
    driver = FakeDriver()
    monkeypatch.setattr(wd, "_ioctl", driver)
    dog = wd.DeviceWatchdog(device, 10.7)
    assert dog.arm() == 10  # whole seconds, rounded down: never longer than the rule assumes
    assert driver.calls == [(wd.WDIOC_SETTIMEOUT, 10), (wd.WDIOC_GETTIMEOUT, 0)]
    dog.pet()
    dog.pet()
    dog.disarm()
    assert device.read_bytes() == b"11V"


def test_a_timeout_longer_than_configured_is_refused_and_stopped(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "watchdog"
    device.touch()
    monkeypatch.setattr(wd, "_ioctl", FakeDriver(readback=30))
    with pytest.raises(wd.WatchdogError, match="30 s timeout"):
        wd.DeviceWatchdog(device, 10).arm()
    assert device.read_bytes() == b"V"  # opened (which starts it), so stopped again at once


def test_softdog_with_soft_noboot_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device, flag = tmp_path / "watchdog", tmp_path / "soft_noboot"
    device.touch()
    flag.write_text("1\n")
    monkeypatch.setattr(wd, "_ioctl", FakeDriver(identity=wd.SOFTDOG_IDENTITY))
    with pytest.raises(wd.WatchdogError, match="soft_noboot"):
        wd.DeviceWatchdog(device, 10, noboot_flag=flag).arm()


def test_a_device_without_the_watchdog_ioctls_is_refused(tmp_path: Path) -> None:
    """The real ioctl on a regular file (ENOTTY): no timeout can be read back, so no guarantee can be given."""
    device = tmp_path / "watchdog"
    device.touch()
    with pytest.raises(wd.WatchdogError, match="cannot read its timeout back"):
        wd.DeviceWatchdog(device, 10).arm()
    assert device.read_bytes() == b"V"


@pytest.mark.skipif(not os.environ.get("ONEHA_TEST_REAL_WATCHDOG"),
                    reason="opening a real watchdog arms it, and a mistake resets the machine: set "
                           "ONEHA_TEST_REAL_WATCHDOG=/dev/watchdogN on a disposable machine to run it")
def test_real_watchdog_device() -> None:
    dog = wd.DeviceWatchdog(Path(os.environ["ONEHA_TEST_REAL_WATCHDOG"]), 10)
    try:
        assert 0 < dog.arm() <= 10
        dog.pet()
    finally:
        dog.disarm()


def test_softdog_is_loaded_when_there_is_no_device(tmp_path: Path) -> None:
    device = tmp_path / "watchdog"
    seen: list[list[str]] = []

    def modprobe(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        device.touch()  # udev creates the node
        return subprocess.CompletedProcess(argv, 0, "", "")

    note = wd.ensure_device(device, 10.5, run=modprobe)
    assert seen == [["modprobe", "softdog", "soft_margin=10"]] and note and "softdog" in note
    assert wd.ensure_device(device, 10, run=modprobe) is None and len(seen) == 1

    def failing(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "modprobe: FATAL: Module softdog not found")

    with pytest.raises(wd.WatchdogError, match="not found"):
        wd.ensure_device(tmp_path / "other", 10, run=failing)


# --- the command ----------------------------------------------------------------------------------------------------

def config(tmp_path: Path, beacon: tuple[str, int] | None, **extra: object) -> Path:
    heartbeats = tmp_path / "heartbeat"
    heartbeats.mkdir(exist_ok=True)
    device = tmp_path / "watchdog"
    device.touch()
    lines = ["[agent]", 'host_name = "host7"', f'heartbeat_dir = "{heartbeats}"', f'watchdog_device = "{device}"',
             "beat_interval_s = 0.1", "loss_timeout_s = 0.5", "watchdog_timeout_s = 1"]
    if beacon is not None:
        lines.append(f'detectors = ["{beacon[0]}:{beacon[1]}"]')
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "oneha.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_agent(cfg: Path, kit: bool = True) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.agentkit"] if kit else [str(Path(sys.executable).parent / "oneha"), "agent"]
    # neither oned nor Redis: credentials that cannot be read and a Redis nobody listens on change nothing
    env = {**os.environ, "ONEHA_CONFIG": "", "ONE_AUTH": "/nonexistent/one_auth", "ONEHA_REDIS__URL": "redis://127.0.0.1:1/0"}
    return subprocess.Popen([*argv, "--config", str(cfg)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def heartbeat(tmp_path: Path) -> Heartbeat | None:
    try:
        return Heartbeat.decode((tmp_path / "heartbeat" / "host7").read_bytes())
    except (OSError, ValueError):
        return None


def test_refuses_to_start_when_the_detectors_threshold_does_not_fit(tmp_path: Path,
                                                                     beacon: socket.socket) -> None:
    cfg = config(tmp_path, beacon.getsockname())
    (tmp_path / "heartbeat" / "detector.json").write_bytes(detector_document(heartbeat_stale_s=2.0, margin_s=1.0))
    proc = run_agent(cfg, kit=False)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "timing rule broken" in lines[0] and "detector.json" in lines[0], err
    assert (tmp_path / "watchdog").read_bytes() == b""  # never opened, never petted
    assert not (tmp_path / "heartbeat" / "host7").exists()


def test_agent_process_arms_beats_and_stops_cleanly(tmp_path: Path, beacon: socket.socket) -> None:
    cfg = config(tmp_path, beacon.getsockname())
    (tmp_path / "heartbeat" / "detector.json").write_bytes(detector_document(heartbeat_stale_s=3.0, margin_s=1.0))
    proc = run_agent(cfg)
    try:
        armed = wait_until(lambda: (hb := heartbeat(tmp_path)) and hb.status == "armed" and hb, 10, what="armed")
        assert armed.deadline_s == pytest.approx(1.6) and armed.host == "host7"
        wait_until(lambda: (hb := heartbeat(tmp_path)) and hb.seq >= armed.seq + 3, 5, what="beats")
        wait_until(lambda: (tmp_path / "watchdog").stat().st_size >= 3, 5, what="pets")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    final = heartbeat(tmp_path)
    assert final is not None and final.status == "stopped" and not final.proves_self_fence
    pets = (tmp_path / "watchdog").read_bytes()
    assert pets.endswith(b"V") and set(pets[:-1]) == {ord("1")}
    assert "timing rule holds" in err


def test_a_stop_while_the_storage_is_lost_leaves_the_watchdog_armed(tmp_path: Path, beacon: socket.socket) -> None:
    proc = run_agent(config(tmp_path, beacon.getsockname()))
    try:
        wait_until(lambda: (hb := heartbeat(tmp_path)) and hb.status == "armed", 10, what="armed")
        (tmp_path / "heartbeat").rename(tmp_path / "unmounted")  # the storage is gone: writes fail
        size = (tmp_path / "watchdog").stat().st_size
        wait_until(lambda: (tmp_path / "watchdog").stat().st_size > size, 5, what="a pet while within loss")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1, err
    assert not (tmp_path / "watchdog").read_bytes().endswith(b"V")  # the storage still says "armed"
    assert "stays armed" in err


def test_watchdog_none_runs_and_promises_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, None, isolation="storage-only", watchdog="none")
    proc = run_agent(cfg, kit=False)
    try:
        wait_until(lambda: (hb := heartbeat(tmp_path)) and hb.status == "no-watchdog", 10, what="heartbeat")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    final = heartbeat(tmp_path)
    assert final is not None and final.status == "stopped"
    assert (tmp_path / "watchdog").read_bytes() == b""


def test_check_option_and_required_settings(tmp_path: Path) -> None:
    ok = subprocess.run([str(Path(sys.executable).parent / "oneha"), "agent", "--check", "--config",
                         str(config(tmp_path, ("127.0.0.1", 9650)))], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "unchecked" in ok.stdout
    cfg = tmp_path / "empty.toml"
    cfg.write_text("[agent]\n")
    bad = subprocess.run([str(Path(sys.executable).parent / "oneha"), "agent", "--check", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "heartbeat_dir is not set" in bad.stderr
