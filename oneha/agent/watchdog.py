"""The Linux watchdog (Documentation/watchdog/watchdog-api.rst): opening the device starts it, every write pets it,
writing the magic character 'V' just before closing stops it (a close without it — a crash — leaves it running,
which is the point: a dead agent must not keep its host alive).

The timeout is set with WDIOC_SETTIMEOUT in whole seconds, rounded down (never longer than the timing rule assumes),
and always read back with WDIOC_GETTIMEOUT: a driver may round it or ignore it, and a timeout longer than
watchdog_timeout_s would break the rule, so the agent refuses it. softdog (`modprobe softdog`) is the fallback when no
device exists: it resets the host from a kernel timer, so it covers a hung agent, a lost storage or network, not a
hard-locked kernel (a hardware watchdog does); with its `soft_noboot` parameter set it only logs, and is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("oneha.agent")


def _ior(nr: int, size: int) -> int:
    return 2 << 30 | size << 16 | ord("W") << 8 | nr  # _IOR('W', nr, size), include/uapi/linux/watchdog.h


def _iowr(nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | ord("W") << 8 | nr


WDIOC_GETSUPPORT = _ior(0, 40)  # struct watchdog_info {u32 options; u32 firmware_version; u8 identity[32]}
WDIOC_SETTIMEOUT = _iowr(6, 4)
WDIOC_GETTIMEOUT = _ior(7, 4)
SOFTDOG_IDENTITY = "Software Watchdog"
SOFTDOG_NOBOOT = Path("/sys/module/softdog/parameters/soft_noboot")

# fcntl.ioctl, looked up at call time so that a test can stand a fake device in for a real one
_ioctl: Callable[..., Any] = fcntl.ioctl


class WatchdogError(Exception):
    """The watchdog cannot give the guarantee the agent would publish."""


class DeviceWatchdog:
    def __init__(self, device: Path, timeout_s: float, noboot_flag: Path = SOFTDOG_NOBOOT) -> None:
        self.device, self.timeout_s, self.noboot_flag = device, timeout_s, noboot_flag
        self.fd: int | None = None
        self.effective_s: int | None = None

    def arm(self) -> int:
        """Open (which starts it), set and read back the timeout; the effective timeout in seconds."""
        wanted = int(self.timeout_s)
        if wanted < 1:
            raise WatchdogError(f"watchdog_timeout_s {self.timeout_s:g} is under the 1 s a watchdog device takes")
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise WatchdogError(f"cannot open {self.device}: {exc.strerror} (another watchdog daemon, or systemd's "
                                "RuntimeWatchdogSec, may hold it)") from exc
        try:
            self.effective_s = self._configure(fd, wanted)
        except WatchdogError:
            _magic_close(fd)  # we never promised anything with it: stop it again
            raise
        self.fd = fd
        return self.effective_s

    def _configure(self, fd: int, wanted: int) -> int:
        identity = _identity(fd)
        if identity == SOFTDOG_IDENTITY and _flag_set(self.noboot_flag):
            raise WatchdogError("softdog is loaded with soft_noboot=1: it would never reset the host")
        try:
            _ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", wanted))
        except OSError as exc:
            log.warning("%s: cannot set the timeout (%s): reading back what it uses", self.device, exc.strerror)
        try:
            got = struct.unpack("i", _ioctl(fd, WDIOC_GETTIMEOUT, struct.pack("i", 0)))[0]
        except OSError as exc:
            raise WatchdogError(f"{self.device}: cannot read its timeout back ({exc.strerror}): not a watchdog "
                                "whose deadline can be relied on") from exc
        if not 0 < got <= self.timeout_s:
            raise WatchdogError(f"{self.device} runs with a {got} s timeout, not within watchdog_timeout_s "
                                f"{self.timeout_s:g}: the published deadline would be wrong")
        return int(got)

    def pet(self) -> None:
        if self.fd is not None:
            os.write(self.fd, b"1")

    def disarm(self) -> None:
        """The magic close: a clean stop, after the "stopped" heartbeat is on the storage."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _magic_close(fd)

    def abandon(self) -> None:
        """Close without the magic character: the watchdog keeps running and resets the host."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _magic_close(fd: int) -> None:
    try:
        os.write(fd, b"V")
    finally:
        os.close(fd)


def _identity(fd: int) -> str | None:
    try:
        raw = _ioctl(fd, WDIOC_GETSUPPORT, bytes(40))
    except OSError:
        return None
    return bytes(raw[8:40]).split(b"\0", 1)[0].decode(errors="replace")


def _flag_set(path: Path) -> bool:
    try:
        return path.read_text().strip() in ("1", "Y", "y")
    except OSError:
        return False


def ensure_device(device: Path, timeout_s: float, run: Callable[..., Any] = subprocess.run,
                  wait_s: float = 5.0) -> str | None:
    """Make sure `device` exists, loading softdog if it does not; a note for the log, or None if it was there.

    Loading softdog does not start it (only opening the device does)."""
    if device.exists():
        return None
    argv = ["modprobe", "softdog", f"soft_margin={max(1, int(timeout_s))}"]
    try:
        done = run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WatchdogError(f"no {device}, and `{' '.join(argv)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise WatchdogError(f"no {device}, and `{' '.join(argv)}` failed: {(done.stderr or '').strip()}")
    deadline = time.monotonic() + wait_s
    while not device.exists():  # udev creates the node after the module registers
        if time.monotonic() > deadline:
            raise WatchdogError(f"softdog loaded but {device} did not appear")
        time.sleep(0.05)
    return (f"no {device}: loaded softdog (soft_margin={max(1, int(timeout_s))}); it covers a hung agent and lost "
            "storage or network, not a hard-locked kernel: a hardware watchdog is better")


class NoWatchdog:
    """watchdog = "none": nothing to arm; the heartbeat says "no-watchdog" and promises nothing."""

    effective_s = None

    def arm(self) -> int:
        raise WatchdogError("no watchdog configured")

    def pet(self) -> None:
        pass

    def disarm(self) -> None:
        pass

    def abandon(self) -> None:
        pass


