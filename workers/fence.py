"""Run the configured fence command with OpenNebula's fence_host.sh contract, failing closed.

The command is an argv list from the configuration, run WITHOUT a shell; the host's XML goes base64-encoded on
stdin (event data never reaches argv); exit status 0 means fenced. Each attempt has a time limit; `fence_attempts`
attempts with jittered backoff; anything else is a failure, and a failure means no VM of the host is touched.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from oneha.opennebula import HostView
from oneha.settings import ClusterPolicy
from oneha.workers.oned import full_jitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FenceResult:
    result: str  # fenced | skipped | not_configured | failed
    attempts: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result in ("fenced", "skipped")

    def summary(self) -> str:
        return f"{self.result} ({self.attempts} attempts) {self.detail}".strip()


def host_xml(host: HostView) -> bytes:
    """The HOST document a fence script reads (ID, NAME, STATE, CLUSTER_ID, TEMPLATE with FENCE_IP & co, VMS)."""
    root = ET.Element("HOST")
    for tag, value in (("ID", host.id), ("NAME", host.name), ("STATE", int(host.state)),
                       ("CLUSTER_ID", host.cluster_id)):
        ET.SubElement(root, tag).text = str(value)
    vms = ET.SubElement(root, "VMS")
    for vid in host.vm_ids:
        ET.SubElement(vms, "ID").text = str(vid)
    template = ET.SubElement(root, "TEMPLATE")
    for key, value in host.template.items():
        if key.isidentifier():
            ET.SubElement(template, key).text = value
    return ET.tostring(root)


def run_fence(policy: ClusterPolicy, host: HostView, before_attempt: object = None) -> FenceResult:
    """Fence `host` per policy. `before_attempt` (callable) runs before each attempt: lease check and extension."""
    if policy.fencing == "none":
        return FenceResult("skipped", 0, 'fencing = "none"')
    if policy.fencing is None:
        return FenceResult("not_configured", 0, "fencing not configured")
    argv = list(policy.fencing)
    stdin = base64.b64encode(host_xml(host))
    detail = ""
    for attempt in range(policy.fence_attempts):
        if callable(before_attempt):
            before_attempt()
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=policy.fence_timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            detail = f"timed out after {policy.fence_timeout_s:g}s"
        except OSError as exc:
            detail = f"cannot run {argv[0]}: {exc.strerror}"
        else:
            if proc.returncode == 0:
                return FenceResult("fenced", attempt + 1)
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            detail = f"exit {proc.returncode}: {tail[0][:200]}"
        log.warning("fencing host %s failed (attempt %d/%d): %s", host.id, attempt + 1, policy.fence_attempts,
                    detail)
        if attempt + 1 < policy.fence_attempts:
            time.sleep(full_jitter(attempt, 0.5, 5.0))  # backoff between attempts
    return FenceResult("failed", policy.fence_attempts, detail)
