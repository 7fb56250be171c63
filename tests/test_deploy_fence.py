"""deploy/fence: fence_ipmi.sh and fence_redfish.sh against stub `ipmitool` / `curl` first on PATH.

The stubs record every call (argv, and whether a password reached them by environment or stdin), answer like a BMC,
and are steered by files in the test's tmp_path: `mode` = ok (power goes off when asked), fail (the BMC answers
nothing), never (power off is accepted but the power stays on).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FENCE = DEPLOY / "fence"
PASSWORD = "s3cr3t-Pa55\"word"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("base64") is None,
                                reason="needs bash and base64")

STUB = r'''#!{python}
import json, os, sys
from pathlib import Path
state = Path({state!r})
mode = (state / "mode").read_text().strip()
power = state / "power"
args = sys.argv[1:]
stdin = "" if os.environ.get("STUB_NO_STDIN") else (sys.stdin.read() if "-K" in args else "")
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"tool": Path(sys.argv[0]).name, "argv": args,
                        "env_password": os.environ.get("IPMI_PASSWORD"), "stdin": stdin}}) + "\n")
if mode == "fail":
    sys.stderr.write("Error: Unable to establish IPMI v2 / RMCP+ session\n")
    sys.exit(1)
tool = Path(sys.argv[0]).name
if tool == "ipmitool":
    if args[-2:] == ["power", "off"]:
        if mode == "ok":
            power.write_text("off")
        print("Chassis Power Control: Down/Off")
    elif args[-2:] == ["power", "status"]:
        print("Chassis Power is " + (power.read_text() if power.exists() else "on"))
    else:
        sys.exit(2)
else:  # curl
    if "POST" in args:
        if mode == "ok":
            power.write_text("off")
    else:
        print(json.dumps({{"PowerState": "Off" if power.exists() and power.read_text() == "off" else "On"}}))
'''


def host_b64(fence_ip: str | None = "10.0.0.21", name: str = "node21", extra: str = "") -> bytes:
    tmpl = f"<FENCE_IP><![CDATA[{fence_ip}]]></FENCE_IP>" if fence_ip is not None else ""
    xml = (f"<HOST><ID>7</ID><NAME>{name}</NAME><STATE>3</STATE><TEMPLATE>{tmpl}{extra}"
           f"<HYPERVISOR>kvm</HYPERVISOR></TEMPLATE></HOST>")
    return base64.b64encode(xml.encode())


@pytest.fixture()
def bmc(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "mode").write_text("ok")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ipmitool", "curl"):
        stub = bindir / tool
        stub.write_text(STUB.format(python=sys.executable, state=str(state)))
        stub.chmod(0o755)
    creds = tmp_path / "fence"
    creds.mkdir()
    cred = creds / "default.cred"
    cred.write_text(f"# test\nuser=admin\npassword={PASSWORD}\n")
    cred.chmod(0o600)

    class Bmc:
        dir = state
        cred_dir = creds

        def set_mode(self, mode: str) -> None:
            (state / "mode").write_text(mode)

        def calls(self) -> list[dict]:
            path = state / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def run(self, script: str, stdin: bytes, deadline: int = 5) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
                   "ONEHA_FENCE_CRED_DIR": str(creds), "ONEHA_FENCE_DEADLINE_S": str(deadline),
                   "ONEHA_FENCE_POLL_S": "0.1", "ONEHA_FENCE_PYTHON": sys.executable}
            env.pop("IPMI_PASSWORD", None)
            return subprocess.run([str(FENCE / script)], input=stdin.decode(), capture_output=True, text=True,
                                  env=env, timeout=30)

    return Bmc()


SCRIPTS = ["fence_ipmi.sh", "fence_redfish.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_success_exits_zero_only_after_power_is_seen_off(bmc, script):
    result = bmc.run(script, host_b64())
    assert result.returncode == 0, result.stderr
    calls = bmc.calls()
    # a power-off request, then at least one status read that saw it off
    assert len(calls) >= 2
    last = calls[-1]["argv"]
    if script == "fence_ipmi.sh":
        assert calls[0]["argv"][-3:] == ["chassis", "power", "off"]
        assert last[-3:] == ["chassis", "power", "status"]
        assert calls[0]["argv"][calls[0]["argv"].index("-H"):][:2] == ["-H", "10.0.0.21"]
        assert "-E" in calls[0]["argv"]
    else:
        post = calls[0]["argv"]
        assert "POST" in post and post[-1] == "https://10.0.0.21/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"
        assert '{"ResetType": "ForceOff"}' in post
        assert last[-1] == "https://10.0.0.21/redfish/v1/Systems/1" and "POST" not in last


@pytest.mark.parametrize("script", SCRIPTS)
def test_password_never_in_argv_but_reaches_the_tool(bmc, script):
    assert bmc.run(script, host_b64()).returncode == 0
    for call in bmc.calls():
        assert not any(PASSWORD in arg or "s3cr3t" in arg for arg in call["argv"]), call
        if script == "fence_ipmi.sh":
            assert call["env_password"] == PASSWORD
        else:
            # curl config on stdin, quotes escaped
            assert call["stdin"] == 'user = "admin:s3cr3t-Pa55\\"word"\n'


@pytest.mark.parametrize("script", SCRIPTS)
def test_bmc_failure_fails_closed(bmc, script):
    bmc.set_mode("fail")
    result = bmc.run(script, host_b64(), deadline=1)
    assert result.returncode != 0
    assert "failed" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_power_never_off_fails_after_the_deadline(bmc, script):
    bmc.set_mode("never")
    result = bmc.run(script, host_b64(), deadline=2)  # whole seconds: 1 could end after a single read
    assert result.returncode != 0
    assert "not off" in result.stderr.lower() or "still not" in result.stderr
    assert len([c for c in bmc.calls() if "POST" not in c["argv"] and "off" not in c["argv"]]) >= 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_fence_ip_fails_without_calling_the_bmc(bmc, script):
    result = bmc.run(script, host_b64(fence_ip=None))
    assert result.returncode != 0
    assert "FENCE_IP" in result.stderr
    assert bmc.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("hostile", ["1.2.3.4; rm -rf /", "$(touch /tmp/pwned)", "-oProxyCommand=x", "a b",
                                     "10.0.0.1\nevil", "`id`", "../../etc"])
def test_hostile_fence_ip_is_refused(bmc, script, hostile):
    result = bmc.run(script, host_b64(fence_ip=hostile))
    assert result.returncode != 0
    assert bmc.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("address", ["bmc-21.example.net", "fd00::21", "192.168.1.250"])
def test_valid_addresses_are_accepted(bmc, script, address):
    result = bmc.run(script, host_b64(fence_ip=address))
    assert result.returncode == 0, result.stderr
    joined = " ".join(bmc.calls()[0]["argv"])
    expected = f"[{address}]" if ":" in address and script == "fence_redfish.sh" else address
    assert expected in joined


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("stdin", [b"", b"not base64 !!!", base64.b64encode(b"<HOST><ID>7</ID"),
                                   base64.b64encode(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                                                    b"<HOST><ID>7</ID><TEMPLATE><FENCE_IP>&e;</FENCE_IP>"
                                                    b"</TEMPLATE></HOST>")])
def test_bad_input_fails_closed(bmc, script, stdin):
    result = bmc.run(script, stdin)
    assert result.returncode != 0
    assert bmc.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_credentials_file_readable_by_others_is_refused(bmc, script):
    (bmc.cred_dir / "default.cred").chmod(0o644)
    result = bmc.run(script, host_b64())
    assert result.returncode != 0
    assert "readable by others" in result.stderr
    assert bmc.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_per_host_credentials_file_wins(bmc, script):
    own = bmc.cred_dir / "node21.cred"
    own.write_text("user=node21admin\npassword=other\n")
    own.chmod(0o600)
    assert bmc.run(script, host_b64()).returncode == 0
    first = bmc.calls()[0]
    assert "node21admin" in first["argv"] or "node21admin" in first["stdin"]


def test_redfish_system_path_from_template_is_validated(bmc):
    ok = bmc.run("fence_redfish.sh", host_b64(extra="<FENCE_REDFISH_SYSTEM>/redfish/v1/Systems/System.Embedded.1"
                                                     "</FENCE_REDFISH_SYSTEM>"))
    assert ok.returncode == 0, ok.stderr
    assert bmc.calls()[0]["argv"][-1].endswith("/Systems/System.Embedded.1/Actions/ComputerSystem.Reset")
    bad = bmc.run("fence_redfish.sh", host_b64(extra="<FENCE_REDFISH_SYSTEM>/../../x?y</FENCE_REDFISH_SYSTEM>"))
    assert bad.returncode != 0


def test_scripts_are_strict_and_executable():
    for script in SCRIPTS:
        path = FENCE / script
        assert os.access(path, os.X_OK)
        assert "set -euo pipefail" in path.read_text()
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(FENCE / "fence-lib.sh")]).returncode == 0
