"""Run the configured fence command with OpenNebula's fence_host.sh contract, failing closed.

The command is an argv list from the configuration, run WITHOUT a shell; the host's XML goes base64-encoded on
stdin (event data never reaches argv); exit status 0 means fenced. Each attempt has a time limit; `fence_attempts`
attempts with jittered backoff; anything else is a failure, and a failure means no VM of the host is touched.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from oneha.backoff import full_jitter
from oneha.opennebula import HostView
from oneha.settings import ClusterPolicy

log = logging.getLogger(__name__)

# What a fence command gets from the worker's environment: the basics, and what the shipped scripts in deploy/fence/
# document (fence-lib.sh, fence_ipmi.sh, fence_redfish.sh). Nothing else: the worker's own environment holds oned's
# credentials (ONEHA_ONED__SESSION) and fence tools are often third-party. More names: `worker.fence_env`.
FENCE_ENV_BASE = ("PATH", "LANG", "LANGUAGE", "TZ")
FENCE_ENV_SCRIPTS = ("ONEHA_FENCE_CRED_DIR", "ONEHA_FENCE_DEADLINE_S", "ONEHA_FENCE_POLL_S", "ONEHA_FENCE_PYTHON",
                     "ONEHA_IPMI_INTERFACE", "ONEHA_IPMITOOL", "ONEHA_CURL", "ONEHA_REDFISH_TIMEOUT_S")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


def fence_env(extra_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal, explicit environment of a fence command: the allowed names that are set, locale included."""
    environ = os.environ if environ is None else environ
    allowed = {*FENCE_ENV_BASE, *FENCE_ENV_SCRIPTS, *extra_names}
    env = {k: v for k, v in environ.items() if k in allowed or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _attempt(argv: list[str], stdin: bytes, timeout_s: float, env: dict[str, str]) -> str | None:
    """One attempt; None when fenced, else why not. The command runs in its own session (process group); on timeout
    the whole group is killed, so a hung `ipmitool` under a shell script cannot power the host off later."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc.strerror}"
    try:
        _, stderr = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return f"timed out after {timeout_s:g}s"
    if proc.returncode == 0:
        return None
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return f"exit {proc.returncode}: {tail[0][:200]}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The leader is not reaped yet, so its pid still names the group: no risk of signalling someone else's group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()  # reap; the pipes close as the group dies


def run_fence(policy: ClusterPolicy, host: HostView, before_attempt: object = None,
              env_names: Iterable[str] = ()) -> FenceResult:
    """Fence `host` per policy. `before_attempt` (callable) runs before each attempt: lease check and extension.
    `env_names`: further environment variables passed on to the command (`worker.fence_env`)."""
    if policy.fencing == "none":
        return FenceResult("skipped", 0, 'fencing = "none"')
    if policy.fencing is None:
        return FenceResult("not_configured", 0, "fencing not configured")
    argv = list(policy.fencing)
    stdin = base64.b64encode(host_xml(host))
    env = fence_env(env_names)
    detail = ""
    for attempt in range(policy.fence_attempts):
        if callable(before_attempt):
            before_attempt()
        failure = _attempt(argv, stdin, policy.fence_timeout_s, env)
        if failure is None:
            return FenceResult("fenced", attempt + 1)
        detail = failure
        log.warning("fencing host %s failed (attempt %d/%d): %s", host.id, attempt + 1, policy.fence_attempts,
                    detail)
        if attempt + 1 < policy.fence_attempts:
            time.sleep(full_jitter(attempt, 0.5, 5.0))  # backoff between attempts
    return FenceResult("failed", policy.fence_attempts, detail)
