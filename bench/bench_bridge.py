"""Start-up cost of `oneha bridge`: wall time of whole runs (interpreter start included), median of N, side by side
with `python -c pass` and `python -c "import celery"` measured in the same run.
Run: .venv/bin/python -m bench.bench_bridge
"""

from __future__ import annotations

import base64
import os
import statistics
import subprocess
import sys
import time

from oneha.redis_server import RedisServer

N = 15
TEMPLATE = base64.b64encode(b"<HOST><ID>3</ID><STATE>3</STATE><CLUSTER_ID>0</CLUSTER_ID></HOST>").decode()


def run_ms(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    took = (time.perf_counter() - start) * 1000
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {res.stderr.decode()}")
    return took


def main() -> None:
    server = RedisServer.start()
    try:
        env = {**os.environ, "ONEHA_REDIS__URL": server.url}
        oneha = [sys.executable, "-c", "from oneha.cli import main; main()"]
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import celery"': [sys.executable, "-c", "import celery"],
            'python -c "import redis"': [sys.executable, "-c", "import redis"],
            "oneha bridge --hid 3": [*oneha, "bridge", "--hid", "3"],
            "oneha bridge $TEMPLATE": [*oneha, "bridge", TEMPLATE],
        }
        print(f"bench_bridge: wall time per run, median of {N} (min..max), Redis on loopback")
        for name, cmd in cases.items():
            run_ms(cmd, env)  # warm the page cache
            times = [run_ms(cmd, env) for _ in range(N)]
            print(f"  {name:28s} {statistics.median(times):7.1f} ms  ({min(times):.1f}..{max(times):.1f})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
