"""`oneha bridge` as a real subprocess, and the stream consumer that reads what it hands over."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from oneha import redisconn
from oneha.incidents import IncidentStore, Kind
from oneha.keys import BRIDGE_GROUP, Keys
from oneha.opennebula import OnedClient, make_server
from oneha.redis_server import free_port
from oneha.settings import Policy, RedisSettings
from oneha.subscriber.intake import Intake
from oneha.subscriber.stream import StreamConsumer
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import host_xml, incidents, metric, vm_xml

ONEHA = [sys.executable, "-c", "from oneha.cli import main; main()"]
STREAM = Keys().bridge_stream


def bridge(*args: str, stdin: bytes | None = None, url: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ONEHA_")}
    if url is not None:
        environ["ONEHA_REDIS__URL"] = url
    environ.update(env or {})
    return subprocess.run([*ONEHA, "bridge", *args], input=stdin if stdin is not None else b"",
                          capture_output=True, env=environ, timeout=30)


def b64(xml: str) -> str:
    return base64.b64encode(xml.encode()).decode()


def consumer(url: str, oned: OnedClient | None = None, claim_idle_s: float = 30.0,
             name: str | None = None, stale_consumer_s: float = 3600.0) -> StreamConsumer:
    r = redisconn.client(RedisSettings(url=url))
    store = IncidentStore(r)

    def no_oned() -> OnedClient:
        raise AssertionError("oned not expected")

    return StreamConsumer(r, Keys(), Intake(store, Policy()), (lambda: oned) if oned else no_oned,
                          threading.Event(), name=name, claim_idle_s=claim_idle_s, block_ms=50,
                          stale_consumer_s=stale_consumer_s)


def test_template_as_argument_and_on_stdin(redis_url: str, redis_client: redis.Redis) -> None:
    arg = bridge(b64(host_xml(4, 3, cluster=1, vms=(1, 2))), url=redis_url)
    assert arg.returncode == 0, arg.stderr
    # ARGUMENTS_STDIN=yes with the seed's extra arguments after $TEMPLATE, and base64 wrapped over lines.
    text = b64(vm_xml(9, 3, 36, hid=4, seq=3))
    wrapped = "\n".join(text[i:i + 60] for i in range(0, len(text), 60))
    piped = bridge("--stdin", stdin=f"{wrapped} -m -p 5\n".encode(), url=redis_url)
    assert piped.returncode == 0, piped.stderr
    implicit = bridge(stdin=b64(host_xml(4, 3)).encode(), url=redis_url)  # no argument, stdin not a TTY
    assert implicit.returncode == 0, implicit.stderr
    assert redis_client.xlen(STREAM) == 3

    c = consumer(redis_url)
    wait_until(lambda: c.poll_once() == 0 and len(incidents(redis_url)) == 2, 5, what="incidents")
    found = {(i.kind, i.resource_id): i for i in incidents(redis_url)}
    host = found[(Kind.HOST, 4)]
    assert host.cluster_id == 1 and host.reports == 2 and host.source == "bridge"
    assert found[(Kind.VM_FAILURE, 9)].extra["token"] == "3"
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0  # all acknowledged


def test_bare_hid_and_vm_id_are_resolved_through_oned(redis_url: str) -> None:
    with running_lab(hosts=2, vms=2) as lab:
        call(lab.rpc_url, "lab.host.kill", 1)
        oned = OnedClient(make_server(lab.rpc_url, lab.session, 1.0, 3.0))
        wait_until(lambda: oned.host_info(1).failed, 10, what="host 1 in ERROR")
        assert bridge("--hid", "1", url=redis_url).returncode == 0
        assert bridge("--vm-id", "1", url=redis_url).returncode == 0  # VM 1 ran on host 1: UNKNOWN, host's
        assert bridge("--hid", "0", url=redis_url).returncode == 0  # healthy: nothing to open
        c = consumer(redis_url, oned)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_until(lambda: c.poll_once() == 0 and r.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0 and
                   len(incidents(redis_url)) >= 1, 5, what="entries handled")
        kinds = sorted((i.kind.value, i.resource_id) for i in incidents(redis_url))
        assert kinds == [("host", 1)]  # the crashed VM is the host incident's
        IncidentStore(r).cancel_waiting("host", 1, "test: host incident gone")
        assert bridge("--vm-id", "1", url=redis_url).returncode == 0  # no host incident now: the VM's own
        wait_until(lambda: c.poll_once() == 0 and ("vm_crash", 1) in
                   {(i.kind.value, i.resource_id) for i in incidents(redis_url)}, 5, what="the VM's incident")


def test_exit_codes_and_messages(redis_url: str) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    res = bridge("--hid", "3", url=down)
    assert res.returncode == 1
    message = res.stderr.decode().strip()
    assert message.startswith("oneha bridge: cannot hand the event to Redis at redis://127.0.0.1:")
    assert "\n" not in message
    secret = bridge("--hid", "3", url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert secret.returncode == 1 and b"hunter2" not in secret.stderr
    bad = bridge("not-base64!", url=redis_url)
    assert bad.returncode == 2 and b"not base64" in bad.stderr
    not_xml = bridge(base64.b64encode(b"hello").decode(), url=redis_url)
    assert not_xml.returncode == 2 and b"does not decode to XML" in not_xml.stderr
    huge = bridge("--stdin", stdin=base64.b64encode(b"<" * (2 << 20)), url=redis_url)
    assert huge.returncode == 2 and b"too large" in huge.stderr
    two = bridge("--hid", "1", "--vm-id", "2", url=redis_url)
    assert two.returncode == 2


def test_redis_url_from_the_config_file(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    cfg = tmp_path / "oneha.toml"
    cfg.write_text(f'[redis]\nurl = "{redis_url}"\nkey_prefix = "other"\n')
    res = bridge("--hid", "2", env={"ONEHA_CONFIG": str(cfg)})
    assert res.returncode == 0, res.stderr
    assert redis_client.xlen(Keys("other").bridge_stream) == 1


def test_malformed_entries_are_acked_and_counted(redis_url: str, redis_client: redis.Redis) -> None:
    redis_client.xadd(STREAM, {"kind": "template", "data": b64("<HOST><ID>1</ID><NAME>&x;</NAME></HOST>")})
    redis_client.xadd(STREAM, {"kind": "template", "data": "@@@"})
    redis_client.xadd(STREAM, {"kind": "template", "data": b"\xff\xfe<HOST>"})  # not UTF-8: must not stall the read
    redis_client.xadd(STREAM, {"kind": b"\xff", "data": "1"})
    redis_client.xadd(STREAM, {"kind": "nonsense", "data": "1"})
    redis_client.xadd(STREAM, {"kind": "hid", "data": "x"})
    before = metric("oneha_events_rejected_total", reason="bad_base64")
    c = consumer(redis_url)
    wait_until(lambda: c.poll_once() == 0 and redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0
               and redis_client.xinfo_groups(STREAM)[0]["last-delivered-id"] != "0-0", 5, what="acks")
    assert metric("oneha_events_rejected_total", reason="bad_base64") == before + 2
    assert incidents(redis_url) == []


def test_entries_of_a_dead_consumer_are_claimed(redis_url: str, redis_client: redis.Redis) -> None:
    bridge(b64(host_xml(6, 3)), url=redis_url)
    # A consumer reads the entry and dies before acknowledging it.
    redis_client.xgroup_create(STREAM, BRIDGE_GROUP, id="0", mkstream=True)
    redis_client.xreadgroup(BRIDGE_GROUP, "dead", {STREAM: ">"}, count=10)
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 1
    survivor = consumer(redis_url, claim_idle_s=0.05, name="alive")
    wait_until(lambda: survivor.poll_once() and incidents(redis_url), 5, what="claimed entry")
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0


def test_dead_consumers_are_deleted_once_idle_with_nothing_pending(redis_url: str, redis_client: redis.Redis
                                                                   ) -> None:
    bridge(b64(host_xml(6, 3)), url=redis_url)
    redis_client.xgroup_create(STREAM, BRIDGE_GROUP, id="0", mkstream=True)
    redis_client.xreadgroup(BRIDGE_GROUP, "holding", {STREAM: ">"}, count=10)  # died holding the entry
    redis_client.xgroup_createconsumer(STREAM, BRIDGE_GROUP, "empty")  # died holding nothing

    def names() -> set[str]:
        return {c["name"] for c in redis_client.xinfo_consumers(STREAM, BRIDGE_GROUP)}

    assert names() == {"holding", "empty"}
    young = consumer(redis_url, name="alive", stale_consumer_s=3600)
    assert young.prune_consumers() == 0  # none idle long enough
    c = consumer(redis_url, name="alive", stale_consumer_s=0.05, claim_idle_s=0.05)
    wait_until(lambda: c.prune_consumers() and names() == {"holding"}, 5, what="empty one deleted")
    # The one holding an entry stays until the entry has been claimed; then it goes too. Nothing is lost.
    wait_until(lambda: c.poll_once() is not None and names() == {"alive"}, 5, what="holder deleted after claim")
    assert [i.resource_id for i in incidents(redis_url)] == [6]
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0


def test_not_acked_while_redis_refuses_the_report(redis_url: str, redis_client: redis.Redis) -> None:
    bridge(b64(host_xml(8, 3)), url=redis_url)
    c = consumer(redis_url, name="c1")

    def failing_report(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("simulated outage during report")

    real = c.intake.store.report_many
    c.intake.store.report_many = failing_report  # type: ignore[method-assign,assignment]
    with pytest.raises(redis.ConnectionError):
        c.poll_once()
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 1  # still ours, not lost
    c.intake.store.report_many = real  # type: ignore[method-assign]
    c._retry_pending_at = 0.0
    wait_until(lambda: c.poll_once() and incidents(redis_url), 5, what="report after the outage")
    assert redis_client.xpending(STREAM, BRIDGE_GROUP)["pending"] == 0
