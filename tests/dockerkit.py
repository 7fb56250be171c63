"""The slow, opt-in Docker tier (tests/test_compose_stack.py, tests/test_install_walk_root.py): its marks and the
question whether a Docker engine answers."""

from __future__ import annotations

import os
import subprocess

import pytest


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def docker_tier(timeout_s: int) -> list[pytest.MarkDecorator]:
    """Slow, bounded, and skipped unless ONEHA_DOCKER_TESTS=1."""
    return [
        pytest.mark.slow,
        pytest.mark.timeout(timeout_s),
        pytest.mark.skipif(os.environ.get("ONEHA_DOCKER_TESTS") != "1", reason="opt-in: ONEHA_DOCKER_TESTS=1"),
    ]
