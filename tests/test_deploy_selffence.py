"""deploy/selffence: the decision logic with a fake clock, the configuration and its timing rule, the script as a
subprocess against a local TCP listener, and a partitioned host of the lab cloud."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SELFFENCE = Path(__file__).resolve().parent.parent / "deploy" / "selffence"
SCRIPT = SELFFENCE / "oneha-selffence"


def _load():
    loader = importlib.machinery.SourceFileLoader("oneha_selffence", str(SCRIPT))
    spec = importlib.util.spec_from_loader("oneha_selffence", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["oneha_selffence"] = module
    loader.exec_module(module)
    return module


sf = _load()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- pure logic ---------------------------------------------------------------------------------------------------

def test_decide_acts_only_after_the_deadline():
    state = sf.State("b", 0.0, 0.0)
    assert not sf.decide(state, 5.0, True, None, 10).act
    assert state.frontend_ok_at == 5.0
    assert not sf.decide(state, 10.0, False, None, 10).act      # lost 5 s
    assert not sf.decide(state, 15.0, False, None, 10).act      # lost exactly the deadline: not yet
    d = sf.decide(state, 15.1, False, None, 10)
    assert d.act and "front-end" in d.reason and d.lost_s == pytest.approx(10.1)
    assert sf.decide(state, 30.0, False, None, 10).act          # repeated while the loss lasts
    assert not sf.decide(state, 31.0, True, None, 10).act       # back: nothing more
    assert state.acted_at is None


def test_decide_storage_loss_counts_when_configured():
    state = sf.State("b", 0.0, 0.0)
    assert not sf.decide(state, 5.0, True, False, 10).act
    d = sf.decide(state, 10.5, True, False, 10)
    assert d.act and "storage" in d.reason
    # not configured (None) = always fine
    state = sf.State("b", 0.0, 0.0)
    assert not sf.decide(state, 100.0, True, None, 10).act


def test_missing_or_foreign_state_starts_the_clock(tmp_path):
    logs: list[str] = []
    path = tmp_path / "state.json"
    s = sf.load_state(path, "boot1", 100.0, logs.append)
    assert (s.frontend_ok_at, s.storage_ok_at) == (100.0, 100.0)
    sf.save_state(path, sf.State("boot1", 1.0, 2.0, 3.0))
    s = sf.load_state(path, "boot1", 100.0, logs.append)
    assert (s.frontend_ok_at, s.storage_ok_at, s.acted_at) == (1.0, 2.0, 3.0)
    s = sf.load_state(path, "boot2", 100.0, logs.append)       # rebooted
    assert s.frontend_ok_at == 100.0
    path.write_text("{garbage")
    assert sf.load_state(path, "boot1", 7.0, logs.append).frontend_ok_at == 7.0
    assert any("another boot" in m for m in logs) and any("unreadable" in m for m in logs)


def test_run_once_with_fake_clock_and_probe(tmp_path):
    cfg = sf.Config(targets=(("fe", 2633),), deadline_s=10, state_file=tmp_path / "s.json", action="command",
                    action_command=("true",))
    clock = [0.0]
    up = [True]
    acted: list[float] = []

    def act(c, decision, log):
        acted.append(clock[0])
        return True

    def run() -> int:
        return sf.run_once(cfg, lambda m: None, now=lambda: clock[0], probe=lambda t, timeout: up[0], act=act,
                           this_boot="b")

    assert run() == 0
    up[0] = False
    for t in range(1, 25):
        clock[0] = float(t)
        assert run() == 0
    assert acted and acted[0] == 11.0            # first run past the 10 s deadline
    assert json.loads((tmp_path / "s.json").read_text())["acted_at"] == 11.0
    up[0] = True
    clock[0] = 30.0
    n = len(acted)
    run()
    assert len(acted) == n


def test_failed_action_exits_1(tmp_path):
    cfg = sf.Config(targets=(("fe", 1),), deadline_s=1, state_file=tmp_path / "s.json")
    sf.save_state(cfg.state_file, sf.State("b", 0.0, 0.0))
    code = sf.run_once(cfg, lambda m: None, now=lambda: 5.0, probe=lambda t, timeout: False,
                       act=lambda c, d, log: False, this_boot="b")
    assert code == 1


def env(**kw: str) -> dict[str, str]:
    return {f"SELFFENCE_{k}": v for k, v in kw.items()}


def test_config_parsing_and_errors(tmp_path):
    cfg = sf.load_config(env(TARGETS="fe1:2633, [fd00::1]:2633", DEADLINE_S="150", STORAGE_TARGETS="nfs:2049",
                             ACTION="poweroff", POWEROFF_COMMAND="/sbin/poweroff -f",
                             CONFIG=str(SELFFENCE / "selffence.conf.example")))
    assert cfg.targets == (("fe1", 2633), ("fd00::1", 2633))
    assert cfg.storage_targets == (("nfs", 2049),)
    assert cfg.poweroff_command == ("/sbin/poweroff", "-f")
    assert cfg.action == "poweroff"
    # the example file itself is a valid configuration that keeps the rule
    example = sf.load_config({"SELFFENCE_CONFIG": str(SELFFENCE / "selffence.conf.example")})
    assert example.deadline_s == 150 and example.action == "destroy-vms"
    assert sf.timing_problem(example) is None
    empty = tmp_path / "empty.conf"
    empty.write_text("# nothing\n")
    for bad in (env(TARGETS="", DEADLINE_S="5"), env(TARGETS="fe", DEADLINE_S="5"),
                env(TARGETS="fe:99999", DEADLINE_S="5"), env(TARGETS="fe:1", DEADLINE_S="0"),
                env(TARGETS="fe:1", DEADLINE_S="x"), env(TARGETS="fe:1", DEADLINE_S="5", ACTION="reboot"),
                env(TARGETS="fe:1", DEADLINE_S="5", ACTION="command"), env(TARGETS="-oops:1", DEADLINE_S="5"),
                env(TARGETS="fe:1", DEADLINE_S="5", CONFIG=str(tmp_path / "missing"))):
        bad.setdefault("SELFFENCE_CONFIG", str(empty))
        with pytest.raises(sf.ConfigError):
            sf.load_config(bad)


def test_timing_rule():
    ok = sf.Config(targets=(("fe", 1),), deadline_s=150, period_s=10, connect_timeout_s=3, frontend_detect_s=180,
                   host_grace_s=60)
    assert sf.timing_problem(ok) is None
    assert ok.worst_case_s == 163
    tight = sf.Config(targets=(("fe", 1), ("fe2", 1)), deadline_s=170, period_s=60, connect_timeout_s=5,
                      frontend_detect_s=180, host_grace_s=60)
    assert "timing rule broken" in sf.timing_problem(tight)
    unknown = sf.Config(targets=(("fe", 1),), deadline_s=1000, frontend_detect_s=180)
    assert sf.timing_problem(unknown) is None


def run_script(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "selffence.conf"
    if not conf.exists():
        conf.write_text("# from the environment\n")
    e = {**os.environ, "SELFFENCE_CONFIG": str(conf), "SELFFENCE_STATE_FILE": str(tmp_path / "state.json"),
         **env(**settings)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=30)


def test_script_refuses_a_configuration_that_breaks_the_rule(tmp_path):
    r = run_script(tmp_path, TARGETS="127.0.0.1:1", DEADLINE_S="200", FRONTEND_DETECT_S="180", HOST_GRACE_S="30")
    assert r.returncode == 2 and "REFUSING" in r.stderr and "timing rule broken" in r.stderr
    assert not (tmp_path / "state.json").exists()
    r = run_script(tmp_path, TARGETS="127.0.0.1:1", DEADLINE_S="200", FRONTEND_DETECT_S="180", HOST_GRACE_S="30",
                   ALLOW_UNSAFE_TIMING="yes", ACTION="none")
    assert r.returncode == 0 and "WARNING" in r.stderr
    r = run_script(tmp_path, "--check", TARGETS="127.0.0.1:1", DEADLINE_S="100", FRONTEND_DETECT_S="180",
                   HOST_GRACE_S="60")
    assert r.returncode == 0 and "configuration ok" in r.stderr
    assert run_script(tmp_path, "--check", DEADLINE_S="100").returncode == 2


def _record_command(tmp_path: Path) -> str:
    marker = tmp_path / "acted.log"
    code = ("import os, sys, time; open(sys.argv[1], 'a').write("
            "f\"{time.monotonic()} {os.environ['SELFFENCE_REASON']}\\n\")")
    return shlex.join([sys.executable, "-c", code, str(marker)])


def test_script_against_a_local_listener(tmp_path):
    """Reachable while a listener runs; after it stops, the action runs once the deadline has passed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    settings = {"TARGETS": f"127.0.0.1:{port}", "DEADLINE_S": "1", "CONNECT_TIMEOUT_S": "0.5",
                "ACTION": "command", "ACTION_COMMAND": _record_command(tmp_path)}
    marker = tmp_path / "acted.log"
    try:
        assert run_script(tmp_path, **settings).returncode == 0
        time.sleep(1.2)
        assert run_script(tmp_path, **settings).returncode == 0
        assert not marker.exists()
    finally:
        listener.close()
    lost_at = time.monotonic()
    r = run_script(tmp_path, **settings)
    assert r.returncode == 0 and not marker.exists(), r.stderr
    while time.monotonic() - lost_at < 0.8:
        run_script(tmp_path, **settings)
        assert not marker.exists()
        time.sleep(0.1)
    time.sleep(0.4)
    r = run_script(tmp_path, **settings)
    assert r.returncode == 0 and "SELF-FENCE" in r.stderr
    assert "front-end unreachable" in marker.read_text()


def test_destroy_vms_uses_virsh(tmp_path):
    virsh = tmp_path / "virsh"
    log = tmp_path / "virsh.log"
    virsh.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                     "if [ \"$3\" = list ]; then printf 'one-12\\none-13\\n\\n'; fi\n")
    virsh.chmod(0o755)
    cfg = sf.Config(targets=(("fe", 1),), deadline_s=1, virsh=(str(virsh), "-c", "qemu:///system"))
    decision = sf.Decision(True, "test", 2.0)
    assert sf.run_action(cfg, decision, lambda m: None)
    assert log.read_text().splitlines() == ["-c qemu:///system list --name --state-running",
                                            "-c qemu:///system destroy one-12", "-c qemu:///system destroy one-13"]
    log.unlink()
    dry = sf.Config(targets=(("fe", 1),), deadline_s=1, virsh=(str(virsh), "-c", "qemu:///system"), dry_run=True)
    assert sf.run_action(dry, decision, lambda m: None)
    assert log.read_text().splitlines() == ["-c qemu:///system list --name --state-running"]


def test_unit_and_timer_agree_with_the_docs():
    service = (SELFFENCE / "oneha-selffence.service").read_text()
    timer = (SELFFENCE / "oneha-selffence.timer").read_text()
    assert "ExecStart=/usr/local/sbin/oneha-selffence" in service and "Type=oneshot" in service
    assert "OnUnitActiveSec=10s" in timer and "WantedBy=timers.target" in timer
    example = sf.load_config({"SELFFENCE_CONFIG": str(SELFFENCE / "selffence.conf.example")})
    assert example.period_s == 10
    assert "* * * * * root /usr/local/sbin/oneha-selffence" in timer
    readme = (SELFFENCE / "README.md").read_text()
    assert "FRONTEND_DETECT_S + HOST_GRACE_S" in readme and "FRONTEND_DETECT_S + HOST_GRACE_S" in SCRIPT.read_text()
    assert os.access(SCRIPT, os.X_OK)


# --- against the lab cloud ----------------------------------------------------------------------------------------

lab_sim = pytest.importorskip("oneha.lab.sim")


def test_partitioned_lab_host_self_fences_after_the_deadline(tmp_path):
    """A lab host is partitioned: the front-end loses it, its domains keep running. The host runs the self-fence;
    its view of the front-end is a closed port. The action (lab.host.fence: the host powers itself off) must come
    after the deadline and not before; afterwards no domain runs there, and no VM runs twice."""
    from oneha.lab.cli import lab_call

    with lab_sim.LabCloud(hosts=3, vms=6, monitoring_interval_s=0.3, step_delay_s=0.03) as lab:
        url, session = lab.rpc_url, lab.session
        hid = 1
        oracle = lab_call(url, "lab.oracle", session=session)
        mine = sorted(v for v, hosts in oracle["running"].items() if hid in hosts)
        assert mine, "the host runs some VMs"
        frontend_port = int(url.rsplit(":", 1)[1].split("/")[0])
        marker = tmp_path / "acted.log"
        fence = ("import sys, time, xmlrpc.client; "
                 "r = xmlrpc.client.ServerProxy(sys.argv[1]).__getattr__('lab.host.fence')(sys.argv[2], "
                 "int(sys.argv[3])); assert r[0], r; open(sys.argv[4], 'a').write(f'{time.monotonic()}\\n')")
        settings = {"DEADLINE_S": "1", "CONNECT_TIMEOUT_S": "0.3", "TIMER_PERIOD_S": "0.2",
                    "FRONTEND_DETECT_S": "0.3", "HOST_GRACE_S": "2", "ACTION": "command",
                    "ACTION_COMMAND": shlex.join([sys.executable, "-c", fence, url, session, str(hid), str(marker)])}
        # healthy: the host reaches oned's real port
        r = run_script(tmp_path, TARGETS=f"127.0.0.1:{frontend_port}", **settings)
        assert r.returncode == 0, r.stderr
        # the partition: oned loses the host, the host loses oned (its target is now a closed port)
        lab_call(url, "lab.host.partition", hid, session=session)
        lost_at = time.monotonic()
        dead = f"127.0.0.1:{closed_port()}"
        first_action = None
        while time.monotonic() - lost_at < 3.0 and first_action is None:
            before = time.monotonic()
            r = run_script(tmp_path, TARGETS=dead, **settings)
            assert r.returncode == 0, r.stderr
            if marker.exists():
                first_action = float(marker.read_text().split()[0])
            else:
                # not yet acted: its domains still run on the partitioned host
                still = lab_call(url, "lab.oracle", session=session)["running"]
                assert all(hid in still[v] for v in mine)
                assert before - lost_at <= 1.0 + 0.5
            time.sleep(0.2)
        assert first_action is not None, "the self-fence never acted"
        assert first_action - lost_at > 1.0             # not before the deadline
        assert first_action - lost_at < 1.0 + 0.2 + 1.0  # within deadline + period (+ process start slack)
        after = lab_call(url, "lab.oracle", session=session)
        assert all(hid not in hosts for hosts in after["running"].values())
        assert after["duplicates"] == []
