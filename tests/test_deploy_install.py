"""`oneha deploy install` puts the deploy kit in place with modes (and owners when root), rewriting paths for
another prefix, never overwriting a config (issue 14). Runs as any user: owners are the current user's group."""

from __future__ import annotations

import grp
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

ONEHA = [sys.executable, "-m", "oneha"]


def install(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    group = grp.getgrgid(os.getegid()).gr_name
    args = ["deploy", "install", "--prefix", str(tmp / "opt"), "--etc", str(tmp / "etc"), "--unit-dir",
            str(tmp / "units"), "--user", group, "--bridge-user", group, *extra]
    return subprocess.run([*ONEHA, *args], capture_output=True, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_says_everything_and_changes_nothing(tmp_path: Path) -> None:
    res = install(tmp_path, "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"would install -m 0755 -o root -g root {tmp_path}/opt/bin/oneha-bridge" in lines
    assert any(line.endswith(f"{tmp_path}/units/oneha-worker@.service") for line in lines)
    assert any(line.startswith("would mkdir -m 0751") and line.endswith(f"{tmp_path}/etc") for line in lines)
    assert not any(tmp_path.iterdir())


def test_install_puts_the_kit_in_place_with_modes_and_paths(tmp_path: Path) -> None:
    res = install(tmp_path)
    assert res.returncode == 0, res.stderr
    opt, etc, units = tmp_path / "opt", tmp_path / "etc", tmp_path / "units"
    expected = {opt / "bin" / "oneha-bridge": 0o755, opt / "fence" / "fence_ipmi.sh": 0o755,
                opt / "fence" / "fence_redfish.sh": 0o755, opt / "fence" / "fence-lib.sh": 0o644,
                opt / "share" / "hooks" / "host_error.hook": 0o644,
                opt / "share" / "hooks" / "register-hooks.sh": 0o755,
                opt / "share" / "prometheus" / "oneha-scrape.yml": 0o644,
                units / "oneha-subscriber.service": 0o644, units / "oneha-flower.service": 0o644,
                etc: 0o751, etc / "fence": 0o750, etc / "oneha.toml": 0o640, etc / "bridge.toml": 0o640}
    assert {path: mode(path) for path in expected} == expected
    unit = (units / "oneha-worker@.service").read_text()
    assert f"ExecStart={opt}/venv/bin/oneha worker --config {etc}/oneha.toml" in unit
    assert not re.search(r"(^|[\s=:\"'])/(opt|etc)/oneha", unit, re.M), "a path of the default prefix is left"
    assert f'COMMAND         = "{opt}/bin/oneha-bridge"' in (opt / "share" / "hooks" / "host_error.hook").read_text()
    assert f"{etc}/bridge.toml" in (opt / "bin" / "oneha-bridge").read_text()
    assert f"edit {etc}/oneha.toml" in res.stdout
    # the fence script finds its library and credentials where they were installed
    assert f"{etc}/fence" in (opt / "fence" / "fence-lib.sh").read_text()


def test_reinstall_upgrades_files_and_keeps_the_configs(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    config = tmp_path / "etc" / "oneha.toml"
    config.write_text("# mine\n")
    (tmp_path / "opt" / "bin" / "oneha-bridge").write_text("old\n")
    res = install(tmp_path)
    assert res.returncode == 0
    assert config.read_text() == "# mine\n" and f"kept {config}" in res.stdout
    assert "old" not in (tmp_path / "opt" / "bin" / "oneha-bridge").read_text()
