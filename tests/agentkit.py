"""Run `oneha agent` as a real process whose watchdog device is a regular file standing in for /dev/watchdog.

A regular file takes the pets and the magic 'V' as writes, but not the watchdog ioctls (ENOTTY): this process
answers them as a watchdog driver would (WDIOC_SETTIMEOUT stored, WDIOC_GETTIMEOUT returns it), and nothing else of
the agent is replaced. Usage: python -m tests.agentkit --config FILE
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from oneha.agent import watchdog


def fake_ioctl(fd: int, request: int, arg: Any = 0, mutate: bool = True) -> bytes:
    if request == watchdog.WDIOC_SETTIMEOUT:
        fake_ioctl.timeout = struct.unpack("i", arg)[0]  # type: ignore[attr-defined]
        return bytes(arg)
    if request == watchdog.WDIOC_GETTIMEOUT:
        return struct.pack("i", getattr(fake_ioctl, "timeout", 60))
    if request == watchdog.WDIOC_GETSUPPORT:
        return bytes(8) + b"oneha test watchdog".ljust(32, b"\0")
    raise OSError(25, "Inappropriate ioctl for device")


def main() -> None:
    watchdog._ioctl = fake_ioctl
    from oneha.cli import main as oneha

    oneha(["agent", *sys.argv[1:]])


if __name__ == "__main__":
    main()
