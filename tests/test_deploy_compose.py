"""docker-compose.yml (+ its override and deploy/compose/host-network.yml), Dockerfile, .dockerignore and .env.example,
parsed. The stack on a real Docker engine: tests/test_compose_stack.py (opt-in)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oneha.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PUBLISHED = yaml.safe_load((ROOT / "docker-compose.override.yml").read_text())["services"]
HOST_NET = yaml.safe_load((ROOT / "deploy/compose/host-network.yml").read_text())["services"]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.override.yml", "deploy/compose/host-network.yml"]
ONEHA_SERVICES = ["subscriber", "reconciler", "worker", "flower"]
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def documented_env() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_services():
    assert set(SERVICES) == {"redis", "subscriber", "reconciler", "worker", "flower", "lab"}


@pytest.mark.parametrize("name", ["subscriber", "reconciler", "worker", "lab"])
def test_oneha_commands_exist_in_the_cli(name):
    command = SERVICES[name]["command"]
    assert isinstance(command, list)
    assert command[0] == "oneha" and command[1] in SUBCOMMANDS


def test_expected_subcommands():
    assert SERVICES["subscriber"]["command"][:2] == ["oneha", "subscribe"]
    assert SERVICES["reconciler"]["command"][:2] == ["oneha", "reconcile"]
    worker = SERVICES["worker"]["command"]
    assert worker[:2] == ["oneha", "worker"] and "--concurrency" in worker
    assert set(worker[worker.index("--queues") + 1].split(",")) == {"oneha.hosts", "oneha.vms"}
    lab = SERVICES["lab"]["command"]
    assert lab[:3] == ["oneha", "lab", "sim"] and lab[lab.index("--bind") + 1] == "0.0.0.0"


def test_flower_shares_the_app_and_requires_auth():
    flower = SERVICES["flower"]
    assert flower["command"][:4] == ["celery", "-A", "oneha.workers.app:app", "flower"]
    assert "--port=5555" in flower["command"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    m = VAR.fullmatch(auth)
    assert m and m.group(1) == "FLOWER_BASIC_AUTH" and m.group(2) == ":?", "Flower auth must be required"
    assert not any("FLOWER_UNAUTHENTICATED_API" in str(v) for v in flower["environment"])
    assert any(p.endswith(":5555") for p in PUBLISHED["flower"]["ports"])
    # the same broker settings as the workers
    assert flower["environment"]["ONEHA_REDIS__URL"] == SERVICES["worker"]["environment"]["ONEHA_REDIS__URL"]


def test_worker_is_scalable():
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    for svc in SERVICES.values():
        assert "container_name" not in svc


def test_lab_is_a_profile_and_nothing_hard_depends_on_it():
    assert SERVICES["lab"]["profiles"] == ["lab"]
    for name, svc in SERVICES.items():
        assert "profiles" not in svc or name == "lab"
        assert "lab" not in (svc.get("depends_on") or {})


def test_redis_persists():
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in COMPOSE["volumes"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_healthcheck_and_restart(name):
    svc = SERVICES[name]
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD"
    if name in ("subscriber", "reconciler", "worker", "flower"):
        assert test[1] == "python"
        port = re.search(r"127\.0\.0\.1:(\d+)/", test[-1]).group(1)
        expected = {"subscriber": "9641", "reconciler": "9641", "worker": "9642", "flower": "5555"}[name]
        assert port == expected
    if name in ONEHA_SERVICES:
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"] == "." and svc["image"] == "oneha:latest"


def test_published_ports_match_what_the_services_listen_on():
    assert "127.0.0.1:9641:9641" in PUBLISHED["subscriber"]["ports"]
    env = SERVICES["subscriber"]["environment"]
    assert env["ONEHA_SUBSCRIBER__METRICS_BIND"] == "0.0.0.0"
    lab = SERVICES["lab"]["command"]
    assert any(p.endswith(":" + lab[lab.index("--port") + 1]) for p in PUBLISHED["lab"]["ports"])
    # the default endpoints point at the lab's ports
    documented = documented_env()
    assert documented["ONE_XMLRPC"] == f"http://lab:{lab[lab.index('--port') + 1]}/RPC2"
    assert documented["ONEHA_SUBSCRIBER__ZMQ_ENDPOINTS"] == f'["tcp://lab:{lab[lab.index("--events-port") + 1]}"]'


def test_credentials_come_from_a_mounted_file():
    for name in ONEHA_SERVICES:
        svc = SERVICES[name]
        assert svc["environment"]["ONE_AUTH"] == "/run/secrets/one_auth"
        assert "one_auth" in svc["secrets"]
        assert not any("PASSWORD" in k or "SESSION" in k for k in svc["environment"])
    secret = COMPOSE["secrets"]["one_auth"]["file"]
    assert VAR.fullmatch(secret).group(1) == "ONE_AUTH_FILE"
    lab_auth = ROOT / documented_env()["ONE_AUTH_FILE"]
    assert lab_auth.is_file() and ":" in lab_auth.read_text()


def test_every_variable_is_documented_in_env_example():
    text = "\n".join((ROOT / name).read_text() for name in COMPOSE_FILES)
    used = {m.group(1) for m in VAR.finditer(text)}
    documented = documented_env()
    assert used <= set(documented), f"undocumented: {sorted(used - set(documented))}"
    assert {"ONE_XMLRPC", "ONE_AUTH_FILE", "FLOWER_BASIC_AUTH", "ONEHA_REDIS__URL"} <= set(documented)
    assert "ONEHA_ONED__SESSION" in (ROOT / ".env.example").read_text()
    # no bare $VAR (compose would interpolate it too, easy to miss)
    assert not re.search(r"\$(?!\{|\$)[A-Za-z_]", text)


def test_env_example_values_are_valid_settings(monkeypatch):
    """The documented values load into oneha's settings model (JSON lists and all)."""
    from oneha.settings import Settings

    for key, value in documented_env().items():
        if key.startswith("ONEHA_") and "__" in key:
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.policy.default.fencing == ["oneha", "lab", "fence-command"]
    assert settings.subscriber.zmq_endpoints == ["tcp://lab:2101"]
    assert settings.redis.url == "redis://redis:6379/0"


def test_dockerfile_installs_the_package_like_the_readme():
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert lines[0].startswith("#") or lines[0].startswith("FROM")
    # the usual base by default; another (a debootstrap import where no registry is reachable) as a build argument
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines and "FROM ${BASE_IMAGE}" in lines
    assert lines.index("ARG BASE_IMAGE=python:3.11-slim") < lines.index("FROM ${BASE_IMAGE}")
    assert re.search(r"pip install --no-cache-dir \$PIP_INSTALL_OPTIONS \.(\s|$)", dockerfile)
    assert 'ARG PIP_INSTALL_OPTIONS=""' in lines
    assert "COPY . /src" in dockerfile
    # the README's way: ./run installs the source tree with pip (editable + extras for development)
    run = (ROOT / "run").read_text()
    assert re.search(r"pip install .*\"\.\[", run)
    assert "./run lab" in (ROOT / "README.md").read_text()
    # non-root
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # the bridge wrapper finds oneha in the image
    assert "ENV ONEHA_BIN=/opt/oneha/venv/bin/oneha" in dockerfile
    assert "PATH=/opt/oneha/venv/bin:$PATH" in dockerfile  # `python` of the healthchecks is the venv's


def test_dockerignore_keeps_secrets_and_junk_out_but_not_the_package():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for entry in (".git", ".venv", ".env"):
        assert entry in ignored
    for needed in ("oneha", "subscriber", "workers", "lab", "pyproject.toml", "README.md", "deploy"):
        assert needed not in ignored


def test_published_ports_are_apart_from_the_services():
    """docker-compose 1.29 refuses published ports with host networking, and no override can remove them."""
    for name, svc in SERVICES.items():
        assert "ports" not in svc, name
    assert set(PUBLISHED) <= set(SERVICES)
    assert all(set(svc) == {"ports"} for svc in PUBLISHED.values())


def test_host_network_variant_binds_loopback_only_on_ports_of_its_own():
    assert set(HOST_NET) == set(SERVICES)
    text = (ROOT / "deploy/compose/host-network.yml").read_text()
    assert "0.0.0.0" not in text
    for name, svc in HOST_NET.items():
        assert svc["network_mode"] == "host", name
        assert "ports" not in svc
    assert HOST_NET["redis"]["command"][:3] == ["redis-server", "--bind", "127.0.0.1"]
    redis = HOST_NET["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"  # the same persistence as docker-compose.yml
    lab = HOST_NET["lab"]["command"]
    assert lab[:3] == ["oneha", "lab", "sim"] and lab[lab.index("--bind") + 1] == "127.0.0.1"
    assert "--address=127.0.0.1" in HOST_NET["flower"]["command"]
    assert HOST_NET["flower"]["command"][:4] == SERVICES["flower"]["command"][:4]
    for name in ("subscriber", "reconciler"):
        assert HOST_NET[name]["environment"]["ONEHA_SUBSCRIBER__METRICS_BIND"] == "127.0.0.1"
    # subscriber and reconciler each on their own port, and each healthcheck asks that port
    ports = {}
    for name in ("subscriber", "reconciler"):
        env = HOST_NET[name]["environment"]["ONEHA_SUBSCRIBER__METRICS_PORT"]
        assert env in HOST_NET[name]["healthcheck"]["test"][-1]
        ports[name] = VAR.fullmatch(env).group(1)
    assert ports["subscriber"] != ports["reconciler"]
    # replicas of one service cannot get a port each from compose: a free one each, found by the healthcheck
    worker = HOST_NET["worker"]
    assert worker["environment"] == {"ONEHA_WORKER__METRICS_BIND": "127.0.0.1", "ONEHA_WORKER__METRICS_PORT": "0"}
    assert "/proc/net/tcp" in worker["healthcheck"]["test"][-1]
    documented = documented_env()
    assert len({documented[p] for p in ("REDIS_PORT", "LAB_PORT", "LAB_EVENTS_PORT", "SUBSCRIBER_METRICS_PORT",
                                        "RECONCILER_METRICS_PORT", "FLOWER_PORT")}) == 6


def _healthcheck_in_own_pid_namespace(serve_metrics: bool) -> subprocess.CompletedProcess[str]:
    """The worker healthcheck of host-network.yml, in a pid namespace of its own (as in a container) beside a
    process that serves Prometheus metrics on a free port, or serves nothing."""
    script = HOST_NET["worker"]["healthcheck"]["test"][-1]
    parent = ("import subprocess, sys\n"
              "from prometheus_client import start_http_server\n"
              f"if {serve_metrics}: start_http_server(0, addr='127.0.0.1')\n"
              "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)\n")
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare for a pid namespace")
    return subprocess.run([unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", parent, script],
                          capture_output=True, text=True, timeout=60)


def test_worker_healthcheck_of_the_host_network_variant_finds_the_free_metrics_port():
    assert _healthcheck_in_own_pid_namespace(serve_metrics=True).returncode == 0
    refused = _healthcheck_in_own_pid_namespace(serve_metrics=False)
    assert refused.returncode != 0 and "no listening socket" in refused.stderr


def _names_in_a_fresh_process(pid: int) -> tuple[str, str]:
    """The heartbeat name and the worker's default node name of a new process whose pid is `pid`, as two containers
    with host networking see it: the host's name, and the same pid in their own pid namespaces."""
    code = (f"import os, sys; os.getpid = lambda: {pid}\n"
            "from click.testing import CliRunner\n"
            "from oneha import heartbeat\n"
            "import oneha.workers.cli as w\n"
            "seen = []\n"
            "w.sys.setswitchinterval = lambda s: None\n"
            "class App:\n"
            "    def worker_main(self, argv): seen.extend(a for a in argv if a.startswith('--hostname='))\n"
            "import oneha.workers.app; oneha.workers.app.app = App()\n"
            "CliRunner().invoke(w.worker, [], catch_exceptions=False)\n"
            "print(heartbeat.component_name('subscriber')); print(seen[0])\n")
    env = {**os.environ, "ONE_XMLRPC": "http://127.0.0.1:2633/RPC2", "ONEHA_ONED__SESSION": "u:p",
           "ONEHA_POLICY__DEFAULT__FENCING": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    component, node = out.stdout.split()
    return component, node


def test_replicas_sharing_the_host_name_and_pid_get_distinct_names():
    """Scaled workers with host networking (deploy/compose/host-network.yml) share the host's name, and each runs
    as the same pid of its own pid namespace: their heartbeats and Celery node names must still differ, or
    `oneha incidents list` counts one worker for three."""
    first, second = _names_in_a_fresh_process(7), _names_in_a_fresh_process(7)
    assert first[0].startswith("subscriber:") and first[1].startswith("--hostname=oneha@")
    assert first[0] != second[0]
    assert first[1] != second[1]
