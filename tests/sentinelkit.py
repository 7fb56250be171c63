"""A real Redis master, three replicas and three Sentinels on loopback (redis-server, and `redis-server --sentinel`)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from oneha.redis_server import RedisServer, find_redis_server, free_port
from oneha.waiting import wait_until

MASTER = "oneha"
DOWN_AFTER_MS = 1000  # how long a silent master takes to be declared down
FAST_SYNC = ("--repl-diskless-sync-delay", "0")  # a replica syncs at once (default: 5 s delay)


@dataclass
class SentinelCluster:
    workdir: Path
    nodes: list[RedisServer]
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=port, socket_timeout=1)
                try:
                    addr = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
                finally:
                    client.close()
                if addr:
                    return int(addr[1])
        return None

    def healthy(self) -> bool:
        """Every Sentinel knows the master, every other node as a replica in sync, and the other two Sentinels."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
            try:
                info = client.sentinel_master(MASTER)  # parsed by redis-py
                replicas = client.sentinel_slaves(MASTER)
            except redis.RedisError:
                return False
            finally:
                client.close()
            ok = [r for r in replicas if not r.get("is_sdown") and r.get("master-link-status") == "ok"]
            if int(info["num-other-sentinels"]) < 2 or len(ok) < len(self.nodes) - 1 or info.get("is_sdown"):
                return False
        return True

    def kill_master(self) -> RedisServer:
        port = self.master_port()
        node = next(n for n in self.nodes if n.port == port)
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        return node

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
        for proc in self.sentinels:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def sentinel_cluster(workdir: Path) -> Iterator[SentinelCluster]:
    master = RedisServer.start(extra_args=FAST_SYNC)
    # Three replicas, so that two successive master losses still leave one replica: with `redis.wait_replicas = 1`
    # a lone master could not confirm any lock until a dead node came back as a replica, and Sentinel waits 8 s
    # before re-enlisting a returning master (SENTINEL_PUBLISH_PERIOD * 4 in sentinel.c), ~10-15 s in all.
    follow = (*FAST_SYNC, "--replicaof", "127.0.0.1", str(master.port))
    replicas = [RedisServer.start(extra_args=follow) for _ in range(3)]
    cluster = SentinelCluster(workdir, [master, *replicas], [free_port() for _ in range(3)])
    try:
        for i, port in enumerate(cluster.sentinel_ports):
            conf = workdir / f"sentinel{i}.conf"  # Sentinel rewrites its config file: one each, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            log = open(workdir / f"sentinel{i}.log", "wb")  # noqa: SIM115 - closed with the process
            cluster.sentinels.append(subprocess.Popen([find_redis_server(), str(conf), "--sentinel"],
                                                      stdout=log, stderr=subprocess.STDOUT))
        wait_until(cluster.healthy, 30, what="Sentinels see the master, the replica and each other")
        yield cluster
    finally:
        cluster.stop()
