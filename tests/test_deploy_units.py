"""deploy/systemd, deploy/hooks, deploy/bin and deploy/oneha.toml.example: parse them and hold them to the CLI."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from oneha.cli import SUBCOMMANDS
from oneha.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = DEPLOY / "systemd"
HOOKS = DEPLOY / "hooks"
ONEHA = "/opt/oneha/venv/bin/oneha"
BRIDGE = "/opt/oneha/bin/oneha-bridge"

SERVICES = {"oneha-subscriber.service": "subscribe", "oneha-reconciler.service": "reconcile",
            "oneha-worker@.service": "worker", "oneha-detect.service": "detect"}

# Failure LCM states of REFERENCE §3 (include/VirtualMachine.h)
FAILURE_STATES = ["BOOT_FAILURE", "BOOT_MIGRATE_FAILURE", "PROLOG_MIGRATE_FAILURE", "PROLOG_FAILURE", "EPILOG_FAILURE",
                  "EPILOG_STOP_FAILURE", "EPILOG_UNDEPLOY_FAILURE", "PROLOG_MIGRATE_POWEROFF_FAILURE",
                  "PROLOG_MIGRATE_SUSPEND_FAILURE", "BOOT_UNDEPLOY_FAILURE", "BOOT_STOPPED_FAILURE",
                  "PROLOG_RESUME_FAILURE", "PROLOG_UNDEPLOY_FAILURE", "PROLOG_MIGRATE_UNKNOWN_FAILURE"]


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's syntax: repeated keys accumulate; an empty assignment is a value too (it resets a list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        assert "=" in line, f"{path.name}: not key=value: {line}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


def test_every_unit_is_known():
    names = {p.name for p in UNITS.iterdir()}
    assert names == set(SERVICES) | {"oneha-flower.service", "oneha-agent.service"}


def test_agent_unit_runs_as_root_without_credentials_and_always_comes_back():
    """The agent (on the hypervisors) needs /dev/watchdog and modprobe, and neither oned nor Redis credentials; a
    crash must be undone quickly (its watchdog is still armed), a refused start (2) not retried."""
    unit = parse_unit(UNITS / "oneha-agent.service")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[:2] == [ONEHA, "agent"] and "agent" in SUBCOMMANDS
    assert argv[argv.index("--config") + 1] == "/etc/oneha/oneha.toml"
    assert one(unit, "Service", "User") == "root"
    assert "LoadCredential" not in unit["Service"] and "ONE_AUTH" not in (UNITS / "oneha-agent.service").read_text()
    assert systemd_restarts(unit, status=0) and systemd_restarts(unit, status=1)
    assert systemd_restarts(unit, sig="SIGKILL") and not systemd_restarts(unit, status=2)
    assert not systemd_restarts(unit, status=0, stopped_by_systemctl=True)
    restart_s = float(one(unit, "Service", "RestartSec").removesuffix("s"))
    assert restart_s * 5 >= 10 and restart_s < 10  # back before a default 10 s watchdog fires
    text = (UNITS / "oneha-agent.service").read_text()
    assert "magic 'V'" in text and "ARMED" in text  # the unit says what a crash does
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_flower_unit_requires_auth_and_stays_on_loopback():
    unit = parse_unit(UNITS / "oneha-flower.service")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[:4] == ["/opt/oneha/venv/bin/celery", "-A", "oneha.workers.app:app", "flower"]
    assert "--address=127.0.0.1" in argv and not any("BASIC_AUTH" in a or "auth" in a for a in argv)
    assert one(unit, "Service", "EnvironmentFile") == "/etc/oneha/flower.env"  # FLOWER_BASIC_AUTH, not argv
    assert one(unit, "Service", "User") == "oneha"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_unit_parses_with_configparser_too(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())


@pytest.mark.parametrize("name,subcommand", sorted(SERVICES.items()))
def test_execstart_names_an_existing_subcommand(name, subcommand):
    unit = parse_unit(UNITS / name)
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == ONEHA
    assert argv[1] == subcommand
    assert argv[1] in SUBCOMMANDS
    assert argv[argv.index("--config") + 1] == "/etc/oneha/oneha.toml"
    # every $VAR the command line uses is given a default in the unit
    env = dict(v.split("=", 1) for v in unit["Service"].get("Environment", []))
    for var in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", one(unit, "Service", "ExecStart")):
        assert var in env, f"{name}: ExecStart uses ${var} without a default Environment="


def test_worker_options_match_the_cli_contract():
    unit = parse_unit(UNITS / "oneha-worker@.service")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert "--concurrency" in argv and "--queues" in argv
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert set(env["ONEHA_WORKER_QUEUES"].split(",")) == {"oneha.hosts", "oneha.vms"}
    assert int(env["ONEHA_WORKER_CONCURRENCY"]) >= 1
    assert any("%i" in v for v in unit["Service"]["EnvironmentFile"])
    # the worker env vars must not be taken for settings (Settings forbids unknown fields)
    os.environ.update(ONEHA_WORKER_CONCURRENCY="4", ONEHA_WORKER_QUEUES="oneha.hosts")
    try:
        Settings()
    finally:
        del os.environ["ONEHA_WORKER_CONCURRENCY"], os.environ["ONEHA_WORKER_QUEUES"]


HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectKernelModules": "yes",
             "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
             "LockPersonality": "yes", "RestrictSUIDSGID": "yes"}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_hardening_and_restart(name):
    unit = parse_unit(UNITS / name)
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert one(unit, "Service", key) == value, key
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    # TCP/UDP to oned, Redis, ZeroMQ and (worker) the BMCs; unix sockets for a local Redis. Nothing else.
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one(unit, "Service", "User") != "root"
    assert "RestartSec" in service
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


CLEAN_SIGNALS = {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"}  # clean exits besides status 0 (systemd.service(5))


def systemd_restarts(unit: dict[str, dict[str, list[str]]], status: int | None = None, sig: str | None = None,
                     stopped_by_systemctl: bool = False) -> bool:
    """systemd.service(5), Restart=: the documented decision after the main process ends, for the settings the
    units use. A stop asked through systemctl is never undone; RestartPreventExitStatus= wins over Restart=."""
    service = unit["Service"]
    restart = one(unit, "Service", "Restart")
    prevent = " ".join(service.get("RestartPreventExitStatus", [])).split()
    success = " ".join(service.get("SuccessExitStatus", [])).split()
    if stopped_by_systemctl or (status is not None and str(status) in prevent) or (sig is not None and sig in prevent):
        return False
    clean = (status == 0 or str(status) in success) if sig is None else (sig in CLEAN_SIGNALS or sig in success)
    return {"always": True, "on-failure": not clean, "on-abnormal": sig is not None and sig not in CLEAN_SIGNALS,
            "no": False}[restart]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_restart_on_any_end_but_a_bad_config_or_a_stop(name):
    """A service that ends by itself comes back, whatever its status — a worker once exited 0 with Redis gone
    (kombu), and `on-failure` left it dead; a bad configuration (exit 2) is not retried in a loop."""
    unit = parse_unit(UNITS / name)
    assert systemd_restarts(unit, status=0)
    assert all(systemd_restarts(unit, status=s) for s in (1, 3, 70, 143))
    assert systemd_restarts(unit, sig="SIGKILL") and systemd_restarts(unit, sig="SIGTERM")
    assert not systemd_restarts(unit, status=2)
    assert not systemd_restarts(unit, status=0, stopped_by_systemctl=True)
    # Restarts must never hit the start rate limit (default 5 starts per 10 s) and leave the unit dead.
    restart_s = float(one(unit, "Service", "RestartSec").removesuffix("s"))
    assert "StartLimitIntervalSec" not in unit.get("Unit", {}) and restart_s * 5 >= 10


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_config_and_credentials(name):
    unit = parse_unit(UNITS / name)
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert env["ONEHA_CONFIG"] == "/etc/oneha/oneha.toml"
    # the credentials file is handed over by systemd; ONE_AUTH points at the copy
    assert one(unit, "Service", "LoadCredential") == "one_auth:/etc/oneha/one_auth"
    assert env["ONE_AUTH"] == "%d/one_auth"


def test_example_config_has_every_section_and_loads():
    data = tomllib.loads((DEPLOY / "oneha.toml.example").read_text())
    assert set(data) == set(Settings.model_fields)
    assert "default" in data["policy"] and data["policy"]["clusters"]
    # every option of every section appears (set or commented out)
    text = (DEPLOY / "oneha.toml.example").read_text()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if section == "policy":
            model = Settings.model_fields["policy"].annotation.model_fields["default"].annotation  # type: ignore[union-attr]
        for option in model.model_fields:  # type: ignore[union-attr]
            if (section, option) == ("oned", "session"):  # environment only, by design
                assert "ONEHA_ONED__SESSION" in text
                continue
            assert re.search(rf"^#? ?{option} =", text, re.M), f"[{section}] {option} missing from the example"
    settings = load_settings(DEPLOY / "oneha.toml.example")
    assert settings.policy.default.fencing == ["/opt/oneha/fence/fence_ipmi.sh"]
    for command in (settings.policy.default.fencing, settings.policy.for_cluster(100).fencing):
        assert isinstance(command, list)
        assert (DEPLOY / "fence" / Path(command[0]).name).is_file()


# --- hooks --------------------------------------------------------------------------------------------------------

def parse_template(path: Path) -> dict[str, str]:
    """OpenNebula template syntax as far as these files use it: KEY = "value" lines, # comments."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([A-Z_]+)\s*=\s*"([^"]*)"', line)
        assert m, f"{path.name}: cannot parse {line!r}"
        assert m.group(1) not in out, f"{path.name}: {m.group(1)} twice"
        out[m.group(1)] = m.group(2)
    return out


def hook_templates() -> list[Path]:
    return sorted(HOOKS.glob("*.hook"))


def test_hook_set_is_complete():
    names = {p.name for p in hook_templates()}
    expected = {"host_error.hook", "vm_unknown.hook"} | {f"vm_{s.lower()}.hook" for s in FAILURE_STATES}
    assert names == expected


@pytest.mark.parametrize("path", hook_templates(), ids=lambda p: p.name)
def test_hook_template_carries_the_template_on_stdin(path):
    t = parse_template(path)
    assert t["TYPE"] == "state"
    assert t["COMMAND"] == BRIDGE
    assert t["ARGUMENTS"] == "$TEMPLATE"
    assert t["ARGUMENTS_STDIN"] == "yes"
    assert t["REMOTE"] == "no"
    assert t["NAME"].startswith("oneha_")
    if path.name == "host_error.hook":
        assert (t["RESOURCE"], t["STATE"]) == ("HOST", "ERROR")
        assert "LCM_STATE" not in t
    else:
        assert (t["RESOURCE"], t["STATE"]) == ("VM", "ACTIVE")
        assert t["LCM_STATE"] == path.stem.removeprefix("vm_").upper()
        assert t["LCM_STATE"] == "UNKNOWN" or t["LCM_STATE"] in FAILURE_STATES


def parse_legacy(text: str) -> list[tuple[str, dict[str, str]]]:
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    hooks = []
    for kind, body in re.findall(r"(HOST_HOOK|VM_HOOK)\s*=\s*\[(.*?)\]", text, re.S):
        attrs = dict((k.upper(), v) for k, v in re.findall(r'([A-Za-z_]+)\s*=\s*"([^"]*)"', body))
        hooks.append((kind, attrs))
    return hooks


def test_legacy_oned_conf_hooks():
    hooks = parse_legacy((HOOKS / "oned.conf.example").read_text())
    host = [a for k, a in hooks if k == "HOST_HOOK"]
    vm = [a for k, a in hooks if k == "VM_HOOK"]
    assert len(host) == 1
    assert host[0]["ON"] == "ERROR" and host[0]["ARGUMENTS"] == "--hid $HID"
    assert {a["ON"] for a in vm} <= {"CREATE", "RUNNING", "SHUTDOWN", "STOP", "DONE", "UNKNOWN", "CUSTOM"}
    assert [a for a in vm if a["ON"] == "UNKNOWN"]
    custom = {a["LCM_STATE"] for a in vm if a["ON"] == "CUSTOM"}
    assert custom == set(FAILURE_STATES)
    for a in vm:
        assert a["ARGUMENTS"] == "--vm-id $ID"
        if a["ON"] == "CUSTOM":
            assert a["STATE"] == "ACTIVE"
    for _, a in hooks:
        assert a["COMMAND"] == BRIDGE
        assert a["REMOTE"] == "no"
    assert len({a["NAME"] for _, a in hooks}) == len(hooks)


def test_bridge_wrapper_passes_arguments_untouched(tmp_path):
    wrapper = DEPLOY / "bin" / "oneha-bridge"
    assert os.access(wrapper, os.X_OK)
    text = wrapper.read_text()
    assert f'ONEHA_BIN="${{ONEHA_BIN:-{ONEHA}}}"' in text
    assert "bridge" in SUBCOMMANDS
    # a fake oneha that prints its argv one per line, and its stdin
    fake = tmp_path / "oneha"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\necho "cfg=$ONEHA_CONFIG"\ncat\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "ONEHA_BIN": str(fake)}

    def run(*args: str, stdin: str = "") -> str:
        return subprocess.run([str(wrapper), *args], input=stdin, capture_output=True, text=True, env=env,
                              check=True).stdout

    assert run("--hid", "3") == "[bridge]\n[--hid]\n[3]\ncfg=/etc/oneha/bridge.toml\n"
    assert run("--vm-id", "42") .startswith("[bridge]\n[--vm-id]\n[42]\n")
    # onehook ARGUMENTS_STDIN=yes: no arguments, the template on stdin
    assert run(stdin="PEhPU1Q+") == "[bridge]\n[--stdin]\ncfg=/etc/oneha/bridge.toml\nPEhPU1Q+"
    # hostile argument text stays one argument and is not evaluated
    assert run("$(touch x); `id` *") == "[bridge]\n[$(touch x); `id` *]\ncfg=/etc/oneha/bridge.toml\n"
    assert not (tmp_path / "x").exists()


def test_register_script_uses_onehook_create():
    text = (HOOKS / "register-hooks.sh").read_text()
    assert "onehook create" in text and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(HOOKS / "register-hooks.sh")]).returncode == 0
