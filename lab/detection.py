"""The lab stack's detection (issue 13): every host's management side (lab/hostside.py, with each host's agent model),
two `oneha detect` instances and the fence command that goes through the hosts' Redfish BMCs.

On the lab's fast profile the detectors' timings are scaled down (probes every 0.3 s; the agents' self-fence deadline
0.2 + 1.0 + 1.0 = 2.2 s, margin 0.5, heartbeat_stale_s 3), and oned's own detection is slowed to 10 s, so that what the
live view shows is what production shows: oneha's detectors prove a failure long before oned declares ERROR.
The host side binds ports 22 and 443 of 127.50.x.y: it needs root (and openssl); without, the stack runs without
detection and says so.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from oneha.lab.hostside import HostSideOptions

DETECTORS = [("127.60.0.1", 9650), ("127.60.0.2", 9650)]
FENCE_REDFISH = Path(__file__).resolve().parent.parent / "deploy" / "fence" / "fence_redfish.sh"
ONED_DETECTION_S = 10.0  # the lab's monitoring interval while detectors run (oned: 165-210 s in production)
BEAT_S, LOSS_S, WATCHDOG_S = 0.2, 1.0, 1.0


def unavailable() -> str | None:
    """Why the lab cannot show detection on this machine, or None."""
    if shutil.which("openssl") is None:
        return "the lab's BMCs need the openssl command"
    for port in (22, 443, 16509):
        with socket.socket() as sock:
            try:
                sock.bind(("127.50.0.250", port))
            except OSError:
                return f"the lab's hosts need port {port} on 127.50.x.y (run as root)"
    return None


def host_side_options() -> HostSideOptions:
    return HostSideOptions(bmc_delay_s=(0.5, 1.5), heartbeat_s=BEAT_S, loss_timeout_s=LOSS_S,
                           watchdog_timeout_s=WATCHDOG_S, detectors=list(DETECTORS), flap_period_s=0.3)


def config_section(heartbeat_dir: Path) -> str:
    return f"""
[detect]
probe_interval_s = 0.3
probe_timeout_s = 0.2
misses_to_suspect = 3
quorum = 2
alive_ttl_s = 1.0
hosts_refresh_s = 1.0
decision_lease_s = 5.0
decision_retry_s = 3.0
heartbeat_dir = "{heartbeat_dir}"
heartbeat_stale_s = 3.0
heartbeat_margin_s = 0.5
heartbeat_fresh_s = 1.0
metrics_port = 0
"""


def fence_command() -> list[str]:
    return ["bash", str(FENCE_REDFISH)]


def detector_env(index: int) -> dict[str, str]:
    addr, port = DETECTORS[index]
    return {"ONEHA_DETECT__INSTANCE": f"lab-detector-{index + 1}", "ONEHA_DETECT__BEACON_BIND": addr,
            "ONEHA_DETECT__BEACON_PORT": str(port), "ONEHA_DETECT__PROBE_SOURCE_ADDRESS": addr}
