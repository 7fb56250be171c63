"""`oneha lab sim` as a subprocess, `oneha lab ctl`, and `oneha lab fence-command`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import pyone
from click.testing import CliRunner

from oneha.lab.cli import lab
from oneha.opennebula import HostState
from oneha.waiting import wait_until
from tests.labkit import call, lab_process, running_lab

ONEHA = [sys.executable, "-c", "from oneha.cli import main; main()"]


def test_sim_subprocess_serves_pyone_and_stops_on_sigterm() -> None:
    with lab_process("--hosts", "3", "--vms", "6", "--monitoring-interval", "0.3", "--step-delay", "0.03") as lp:
        one = pyone.OneServer(lp.rpc_url, session=lp.session)
        assert len(one.hostpool.info().HOST) == 3
        assert len(one.vmpool.info(-2, -1, -1, -1).VM) == 6
        env = {**os.environ, "ONEHA_LAB_URL": lp.rpc_url}
        out = subprocess.run([*ONEHA, "lab", "ctl", "kill-host", "2"], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: int(one.host.info(2).STATE) == HostState.ERROR, 10, what="ERROR")
        lp.process.send_signal(signal.SIGTERM)
        assert lp.process.wait(timeout=10) == 0


def test_ctl_commands() -> None:
    runner = CliRunner()
    with running_lab(hosts=2, vms=2) as cloud:
        url = ["ctl", "--url", cloud.rpc_url]
        for args in (["partition-host", "0"], ["revive-host", "0"], ["fence-host", "1"], ["revive-host", "1"]):
            result = runner.invoke(lab, [*url, *args])
            assert result.exit_code == 0, result.output
        wait_until(lambda: call(cloud.rpc_url, "lab.oracle")["running"].get("0") == [0], 5, what="vm 0 runs")
        assert runner.invoke(lab, [*url, "crash-vm", "0"]).exit_code == 0
        assert runner.invoke(lab, [*url, "fail-vm", "0", "--state", "BOOT_FAILURE", "--sticky"]).exit_code == 0
        result = runner.invoke(lab, [*url, "faults", "--latency-ms", "5", "--error-rate", "0"])
        assert json.loads(result.output)["latency_ms"] == 5
        oracle = json.loads(runner.invoke(lab, [*url, "oracle"]).output)
        assert set(oracle) == {"running", "duplicates", "lost", "timeline"}
        stats = json.loads(runner.invoke(lab, [*url, "stats"]).output)
        assert stats["calls"]["lab.vm.crash"] == 1
        missing = runner.invoke(lab, [*url, "kill-host", "99"])
        assert missing.exit_code != 0 and "0x400" in missing.output


def test_fence_command_contract() -> None:
    with running_lab(hosts=2, vms=2) as cloud:
        host_xml = call(cloud.rpc_url, "one.host.info", 1)
        stdin = base64.b64encode(host_xml.encode()).decode()
        env = {**os.environ, "ONEHA_LAB_URL": cloud.rpc_url}
        failing = subprocess.run([*ONEHA, "lab", "fence-command"], input=stdin, text=True, capture_output=True,
                                 env={**env, "ONEHA_LAB_FENCE_FAIL": "1"}, timeout=30)
        assert failing.returncode != 0 and "fail" in failing.stderr
        assert call(cloud.rpc_url, "lab.oracle")["running"]["1"] == [1]
        bad = subprocess.run([*ONEHA, "lab", "fence-command"], input="not base64!", text=True, capture_output=True,
                             env=env, timeout=30)
        assert bad.returncode != 0
        ok = subprocess.run([*ONEHA, "lab", "fence-command"], input=stdin, text=True, capture_output=True, env=env,
                            timeout=30)
        assert ok.returncode == 0, ok.stderr
        assert "1" not in call(cloud.rpc_url, "lab.oracle")["running"]
