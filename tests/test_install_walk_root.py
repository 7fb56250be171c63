"""docs/operations.md §1 walked as root in a clean root: a fresh container of the debootstrap base image runs
tests/install_walk_root.sh (Debian's packages, the wheel, the accounts, `oneha deploy install` with real owners and
modes, the config, `oneha config check` all ✓ against the lab, who reads what, the bridge as oneadmin, the services
as oneha, upgrade, uninstall).

Slow tier, opt-in like the compose test: ONEHA_DOCKER_TESTS=1 and a Docker engine that answers (docs/compose.md says
how to start one without bridge or NAT). The container uses host networking and everything in it binds 127.0.0.1 on
free ports; the source tree is mounted read-only; PyPI is reached with this machine's CA bundle (read-only), Debian's
mirror as debootstrap reached it. Run with -s to see the walk and its figures:

    ONEHA_DOCKER_TESTS=1 .venv/bin/pytest -s tests/test_install_walk_root.py

Variables: ONEHA_BASE_IMAGE (default oneha-base:local; deploy/compose/base-image.sh builds it), ONEHA_DOCKER_WORKDIR
(default /var/tmp/oneha-docker; the walk's logs and figures go to walk-PID/ there and are kept).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dockerkit import docker_tier, engine_answers

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = Path(os.environ.get("ONEHA_DOCKER_WORKDIR", "/var/tmp/oneha-docker"))
BASE_IMAGE = os.environ.get("ONEHA_BASE_IMAGE", "oneha-base:local")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


pytestmark = docker_tier(timeout_s=1800)


def source_files() -> bytes:
    """What a clone of this tree holds: tracked and untracked-but-not-ignored files and symlinks (oneha/lab -> ../lab),
    not the deleted ones, not .venv or caches."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    return b"".join(name + b"\0" for name in listed.split(b"\0") if name and os.path.lexists(ROOT / os.fsdecode(name)))


def test_install_walk_in_a_clean_root() -> None:
    if not engine_answers():
        pytest.skip("no Docker engine answers (docs/compose.md: start dockerd)")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        pytest.skip(f"no base image {BASE_IMAGE} (deploy/compose/base-image.sh {BASE_IMAGE})")
    walk = WORKDIR / f"walk-{os.getpid()}"
    walk.mkdir(parents=True, exist_ok=True)
    (walk / "files.lst").write_bytes(source_files())
    certs = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-e", f"PIP_CERT={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    proxies = [a for k in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") if k in os.environ for a in ("-e", k)]
    t0 = time.monotonic()
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "host", "-v", f"{ROOT}:/src:ro", "-v", f"{walk}:/walk",
         *certs, *proxies, BASE_IMAGE, "bash", "/src/tests/install_walk_root.sh"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1700)
    elapsed_s = time.monotonic() - t0
    sys.stdout.write(done.stdout)
    print(f"container run, start to end: {elapsed_s:.1f} s; logs and figures in {walk}")
    assert done.returncode == 0, f"the walk failed (exit {done.returncode}); see above and {walk}"
    assert "install walk in a clean root passed" in done.stdout
    assert (walk / "figures.tsv").read_text().count("\n") >= 10
