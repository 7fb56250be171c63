"""The operator's commands as an operator meets them (issue 14): `oneha incidents` answers in one line when Redis is
down, shows dates and durations, takes its options before or after the subcommand, writes plain text to a pipe;
`oneha bridge` says what it queued. Real subprocesses, real Redis."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import redis

from oneha.incidents import IncidentStore, Kind, Status
from oneha.lab.xmlwriter import hook_message
from tests.test_bridge import b64, bridge
from tests.workerkit import write_config

ONEHA = [sys.executable, "-m", "oneha"]
SUBCOMMANDS = (["list"], ["list", "--all"], ["show", "1"], ["approve", "1"], ["pause", "--reason", "x"], ["resume"])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEHA_", "ONE_"))}
    return subprocess.run([*ONEHA, "incidents", *args], capture_output=True, text=True, env=env, timeout=30)


def test_every_subcommand_says_redis_is_down_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    cfg = write_config(tmp_path, dead, "http://127.0.0.1:2633/RPC2")
    for sub in SUBCOMMANDS:
        res = run("--config", str(cfg), *sub)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, (sub, res.stderr[-1500:])
        assert lines[0].startswith(f"oneha incidents: cannot reach Redis at {dead}"), (sub, lines)


def seeded(tmp_path: Path, redis_url: str) -> tuple[Path, int]:
    store = IncidentStore(redis.Redis.from_url(redis_url, decode_responses=True))
    rep = store.report(Kind.HOST, 4, 0, 60, "test")
    store.record_vm(rep.incident_id, 12, {"action": "recreate", "result": "ok", "took_s": 2.5})
    store.set_status(rep.incident_id, Status.HELD, "storm guard")
    return write_config(tmp_path, redis_url, "http://127.0.0.1:2633/RPC2"), rep.incident_id


def test_times_are_dates_and_durations_and_a_pipe_gets_plain_text(tmp_path: Path, redis_url: str) -> None:
    cfg, iid = seeded(tmp_path, redis_url)
    for args in (["list"], ["show", str(iid)]):
        out = run("--config", str(cfg), *args).stdout
        assert not re.search(r"\b1\d{9}\.\d+", out), out  # no epoch floats
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \([0-9.]+m?s ago\)", out), out
        assert "\t" in out and not any(ch in out for ch in "┃━│─┏"), out  # no table drawing in a pipe
    shown = run("--config", str(cfg), "show", str(iid)).stdout
    assert "grace_s" in shown and "1m00s" in shown and "2.5s" in shown, shown
    assert "# audit log" in shown and "status:held" in shown


def test_options_before_or_after_the_subcommand(tmp_path: Path, redis_url: str) -> None:
    cfg, iid = seeded(tmp_path, redis_url)
    before = run("--config", str(cfg), "--json", "show", str(iid))
    after = run("show", str(iid), "--config", str(cfg), "--json")
    mixed = run("--json", "show", str(iid), "--config", str(cfg))
    assert before.returncode == after.returncode == mixed.returncode == 0, after.stderr
    assert json.loads(before.stdout)["incident"]["id"] == iid
    assert json.loads(before.stdout)["vms"] == json.loads(after.stdout)["vms"] == json.loads(mixed.stdout)["vms"]
    listed = [json.loads(run(*order).stdout) for order in (("--config", str(cfg), "--json", "list"),
                                                           ("list", "--json", "--config", str(cfg)))]
    assert listed[0] == listed[1] and listed[0][0]["id"] == iid
    paused = run("pause", "--reason", "maintenance", "--config", str(cfg), "--json")
    assert json.loads(paused.stdout) == {"paused": True, "reason": "maintenance"}
    resumed = run("--config", str(cfg), "resume")
    assert resumed.stdout.startswith("recovery resumed;"), resumed.stdout


def test_bridge_says_what_it_queued(redis_url: str) -> None:
    body = "<HOST><ID>3</ID><NAME>h3</NAME><STATE>3</STATE></HOST>"
    res = bridge(b64(hook_message("HOST", 3, "ERROR", None, "h3", body)), url=redis_url)
    assert res.returncode == 0, res.stderr
    line = res.stdout.decode().strip()
    assert re.fullmatch(r"queued host 3 ERROR \(template, \d+ bytes\) as entry \d+-\d+ of oneha:bridge:events at "
                        + re.escape(redis_url), line), line
    by_id = bridge("--vm-id", "7", url=redis_url).stdout.decode().strip()
    assert by_id.startswith("queued VM 7 as entry "), by_id


def test_bridge_names_the_object_of_a_hook_template(redis_url: str) -> None:
    """A state hook's $TEMPLATE is the bare <HOST>/<VM> element (REFERENCE §2), not a HOOK_MESSAGE: the line still
    names the host or VM, with its numeric states."""
    host = bridge(b64("<HOST><ID>3</ID><NAME>h3</NAME><STATE>3</STATE></HOST>"), url=redis_url)
    assert host.stdout.decode().startswith("queued host 3 state 3 (template, "), host.stdout
    vm = bridge(b64("<VM><ID>42</ID><UID>0</UID><NAME>v</NAME><STATE>3</STATE><LCM_STATE>16</LCM_STATE></VM>"),
                url=redis_url)
    assert vm.stdout.decode().startswith("queued VM 42 state 3/16 (template, "), vm.stdout
