"""The compose stack on a real Docker engine: build, up, heal a failed host, Flower, scale, down (docs/compose.md).

Slow tier, opt-in: ONEHA_DOCKER_TESTS=1 and a Docker engine that answers. No image registry is needed: the base
image comes from debootstrap (deploy/compose/base-image.sh), the Python packages from a wheelhouse that a container
of that base prepares (its own Python, so environment markers match), and Redis from Debian's package
(deploy/compose/redis.Dockerfile). Every service uses host networking and binds 127.0.0.1 on free ports
(deploy/compose/host-network.yml). Run with -s to see the figures:

    ONEHA_DOCKER_TESTS=1 .venv/bin/pytest -s tests/test_compose_stack.py

Variables: ONEHA_BASE_IMAGE (default oneha-base:local, built when missing), ONEHA_COMPOSE (the compose command,
default `docker compose` when that plugin answers, else `docker-compose`), ONEHA_DOCKER_WORKDIR (default
/var/tmp/oneha-docker: build context, wheelhouse, root filesystem; never the source tree).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oneha.lab.cli import lab_call
from oneha.waiting import wait_until
from tests.dockerkit import docker_tier, engine_answers

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = Path(os.environ.get("ONEHA_DOCKER_WORKDIR", "/var/tmp/oneha-docker"))
BASE_IMAGE = os.environ.get("ONEHA_BASE_IMAGE", "oneha-base:local")
REDIS_IMAGE = "oneha-redis:local"
WORKERS = 3
FLOWER_AUTH = "admin:compose-test"
ALIVE = re.compile(r"(\d+) subscriber\(s\), (\d+) worker\(s\)")


pytestmark = docker_tier(timeout_s=3600)


def compose_command() -> list[str]:
    if os.environ.get("ONEHA_COMPOSE"):
        return shlex.split(os.environ["ONEHA_COMPOSE"])
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def sh(*argv: str | Path, timeout_s: float = 1800, **kw: Any) -> str:
    """Run, fail with the output's tail on a non-zero exit; return stdout."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout_s, **kw)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} -> {done.returncode}\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done.stdout


def timed(figures: dict[str, Any], name: str, fn: Any) -> Any:
    t0 = time.monotonic()
    result = fn()
    figures[name] = round(time.monotonic() - t0, 1)
    print(f"  {name}: {figures[name]} s", flush=True)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_context() -> Path:
    """The tracked and untracked-but-not-ignored files, plus a wheelhouse built by the base image's own Python."""
    context = WORKDIR / f"context-{os.getpid()}"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    files = sh("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    # PyPI as this machine reaches it: its CA bundle (a TLS-inspecting proxy's, here), read-only, in the container.
    certs = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "-e", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
    if not Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        certs = []
    proxies = [a for k in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY") if k in os.environ for a in ("-e", k)]
    sh("docker", "run", "--rm", "--network", "host", "-v", f"{context}:/ctx", *certs, *proxies, BASE_IMAGE,
       "sh", "-c", "python3 -m venv /tmp/v && /tmp/v/bin/pip wheel --quiet --disable-pip-version-check "
       "--wheel-dir /ctx/wheels /ctx 'setuptools>=77' && rm -rf /ctx/build /ctx/*.egg-info")
    return context


def env_file(project: str, ports: dict[str, int]) -> Path:
    """.env.example with the endpoints on 127.0.0.1, free ports, a short grace period, the local Redis image."""
    values = {
        "COMPOSE_PROJECT_NAME": project,
        "ONE_XMLRPC": f"http://127.0.0.1:{ports['LAB_PORT']}/RPC2",
        "ONEHA_LAB_URL": f"http://127.0.0.1:{ports['LAB_PORT']}/RPC2",
        "ONEHA_SUBSCRIBER__ZMQ_ENDPOINTS": f'["tcp://127.0.0.1:{ports["LAB_EVENTS_PORT"]}"]',
        "ONEHA_REDIS__URL": f"redis://127.0.0.1:{ports['REDIS_PORT']}/0",
        "ONE_AUTH_FILE": str(ROOT / "deploy/compose/lab.one_auth"),
        "ONEHA_POLICY__DEFAULT__HOST_GRACE_S": "5",
        "REDIS_IMAGE": REDIS_IMAGE,
        "FLOWER_BASIC_AUTH": FLOWER_AUTH,
        "WORKER_CONCURRENCY": "4",
        **{k: str(v) for k, v in ports.items()},
    }
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        if line and not line.startswith("#") and key in values:
            line = f"{key}={values.pop(key)}"
        lines.append(line)
    assert not values, f"not in .env.example: {sorted(values)}"
    path = WORKDIR / f"{project}.env"
    path.write_text("\n".join(lines) + "\n")
    return path


class Stack:
    def __init__(self, compose: list[str], env: Path, project: str) -> None:
        self.project = project
        self.base = [*compose, "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"),
                     "-f", str(ROOT / "deploy/compose/host-network.yml"), "--profile", "lab"]

    def __call__(self, *args: str, timeout_s: float = 600) -> str:
        return sh(*self.base, *args, timeout_s=timeout_s, cwd=ROOT)

    def containers(self, *extra: str) -> list[str]:
        out = sh("docker", "ps", "-q", *extra, "--filter", f"label=com.docker.compose.project={self.project}")
        return out.split()

    def unhealthy(self) -> list[str]:
        ids = self.containers()
        states = json.loads(sh("docker", "inspect", *ids)) if ids else []
        return [c["Name"] for c in states if (c["State"].get("Health") or {}).get("Status") != "healthy"]

    def alive(self) -> tuple[int, int]:
        """(subscribers, workers) with a fresh heartbeat, as `oneha incidents list` in the image counts them."""
        out = self("exec", "-T", "subscriber", "oneha", "incidents", "list", timeout_s=60)
        m = ALIVE.search(out)
        assert m, out
        return int(m.group(1)), int(m.group(2))

    def leftovers(self) -> dict[str, list[str]]:
        label = ["--filter", f"label=com.docker.compose.project={self.project}"]
        return {"containers": self.containers("-a"),
                "networks": sh("docker", "network", "ls", "-q", *label).split(),
                "volumes": sh("docker", "volume", "ls", "-q", *label).split()}


def http_status(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, Any]]:
    figures: dict[str, Any] = {}
    yield figures
    print("\ncompose stack figures: " + json.dumps(figures), flush=True)
    (WORKDIR / "compose-figures.json").write_text(json.dumps(figures, indent=2) + "\n")


def test_compose_stack_heals_scales_and_leaves_nothing(figures: dict[str, Any]) -> None:
    if not engine_answers():
        pytest.skip("no Docker engine answers (docs/compose.md: start dockerd)")
    compose = compose_command()
    figures["compose"] = sh(*compose, "version").splitlines()[0]
    WORKDIR.mkdir(parents=True, exist_ok=True)
    print(flush=True)
    timed(figures, "base_image_s", lambda: sh(ROOT / "deploy/compose/base-image.sh", BASE_IMAGE, WORKDIR))
    context = timed(figures, "wheelhouse_s", build_context)
    try:
        timed(figures, "oneha_image_s", lambda: sh(
            "docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", "PIP_INSTALL_OPTIONS=--no-index --find-links=/src/wheels", "-t", "oneha:latest", context))
        timed(figures, "redis_image_s", lambda: sh(
            "docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "-f", context / "deploy/compose/redis.Dockerfile", "-t", REDIS_IMAGE, context / "deploy/compose"))
    finally:
        shutil.rmtree(context, ignore_errors=True)

    project = f"onehatest{os.getpid()}"
    ports = {k: free_port() for k in ("REDIS_PORT", "LAB_PORT", "LAB_EVENTS_PORT", "FLOWER_PORT",
                                      "SUBSCRIBER_METRICS_PORT", "RECONCILER_METRICS_PORT")}
    stack = Stack(compose, env_file(project, ports), project)
    try:
        run_stack(stack, ports, figures)
    finally:
        down = timed(figures, "down_s", lambda: stack("down", "-v", "--remove-orphans", timeout_s=300))
        left = stack.leftovers()
        figures["left_after_down"] = left
        assert left == {"containers": [], "networks": [], "volumes": []}, down


def run_stack(stack: Stack, ports: dict[str, int], figures: dict[str, Any]) -> None:
    t0 = time.monotonic()
    stack("up", "-d", "--no-build", "--scale", f"worker={WORKERS}")
    assert len(stack.containers()) == 5 + WORKERS  # redis, lab, subscriber, reconciler, flower + workers
    assert stack.leftovers()["networks"] == []  # host networking: no network of the project's own
    wait_until(lambda: not stack.unhealthy(), 600, 1.0, what="every container healthy")
    figures["time_to_healthy_s"] = round(time.monotonic() - t0, 1)
    # all three replicas beat (distinct names although they share the host's name and their pid), and both the
    # subscriber and the reconciler
    def alive() -> bool:
        figures["alive_subscribers_workers"] = list(stack.alive())  # the last count seen, also when this fails
        return figures["alive_subscribers_workers"] == [2, WORKERS]

    wait_until(alive, 60, 1.0, what=f"heartbeats of 2 subscribers and {WORKERS} workers")

    flower = f"http://127.0.0.1:{ports['FLOWER_PORT']}"
    assert http_status(f"{flower}/api/workers")[0] == 401
    assert http_status(f"{flower}/api/workers", "admin:wrong")[0] == 401
    workers = wait_until(lambda: len(w := json.loads(http_status(f"{flower}/api/workers?refresh=1", FLOWER_AUTH)[1]
                                                      or b"{}")) == WORKERS and w, 120, 1.0, what="Flower: workers")
    figures["flower_workers"] = len(workers)

    heal(f"http://127.0.0.1:{ports['LAB_PORT']}/RPC2", figures)


def heal(url: str, figures: dict[str, Any]) -> None:
    """Kill the host that runs most VMs; every one of its VMs runs again elsewhere, none twice, none lost."""
    before = lab_call(url, "lab.oracle")
    assert before["duplicates"] == [] and before["lost"] == []
    per_host: dict[int, list[str]] = {}
    for vm, hosts in before["running"].items():
        per_host.setdefault(hosts[0], []).append(vm)
    host, vms = max(per_host.items(), key=lambda kv: len(kv[1]))
    duplicates_seen: set[int] = set()

    def healed() -> bool:
        oracle = lab_call(url, "lab.oracle")
        duplicates_seen.update(oracle["duplicates"])
        running = oracle["running"]
        return (not oracle["lost"] and all(vm in running and host not in running[vm] for vm in vms)
                and len(running) == len(before["running"]))

    t0 = time.monotonic()
    lab_call(url, "lab.host.kill", host)
    wait_until(healed, 300, 0.5, what=f"the VMs of host {host} running elsewhere")
    figures["heal_s"] = round(time.monotonic() - t0, 1)  # kill -> all back; includes the 5 s grace period
    figures["healed_vms"] = len(vms)
    after = lab_call(url, "lab.oracle")
    figures["duplicates"], figures["lost"] = len(after["duplicates"]), len(after["lost"])
    assert not duplicates_seen and after["duplicates"] == [] and after["lost"] == []
