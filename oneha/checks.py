"""`oneha config check`: is the world around a valid configuration ready for recovery?

Each check gives one line: ✓ ok, ! a warning (recovery still works), ✗ a failure that prevents recovery or makes
it unsafe (the command then exits 1). Every check is bounded in time; nothing is changed anywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from oneha.settings import ClusterPolicy, RedisSettings, Settings

Status = Literal["ok", "warn", "fail"]
MARK = {"ok": "✓", "warn": "!", "fail": "✗"}
# ZeroMQ events and the hook system as oneha uses them: OpenNebula 5.12 and newer (REFERENCE §1-2).
OLDEST_SUPPORTED = (5, 12)
NEWEST_TESTED_MAJOR = 7
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" → {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{MARK[self.status]} {self.name}: {self.detail}{fix}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def run_all(settings: Settings, zmq_wait_s: float = 3.0) -> list[Check]:
    checks: list[Check] = []
    checks += oned_checks(settings)
    checks += [redis_check("redis", settings.redis, "incident store"), broker_check(settings)]
    checks += fencing_checks(settings)
    checks += metrics_port_checks(settings)
    checks += zmq_checks(settings.subscriber.zmq_endpoints, zmq_wait_s)
    checks += detection_checks(settings)
    return checks


# -- oned ---------------------------------------------------------------------------------------------------------

def oned_checks(settings: Settings) -> list[Check]:
    from oneha.opennebula import ErrorKind, classify_error, make_server
    from oneha.settings import ConfigError

    o = settings.oned
    try:
        session = settings.oned_session
    except ConfigError as exc:
        return [Check("oned credentials", "fail", str(exc), "write `user:password` there, mode 0600")]
    server = make_server(o.endpoint, session, min(o.connect_timeout_s, TIMEOUT_S), min(o.read_timeout_s, TIMEOUT_S),
                         o.https_verify)
    try:
        version = str(server.system.version())
    except Exception as exc:
        if classify_error(exc) is ErrorKind.TRANSIENT:
            return [Check("oned reachable", "fail", f"{o.endpoint}: {_short(exc)}",
                          "start oned, or fix oned.endpoint (ONE_XMLRPC)")]
        return [Check("oned credentials", "fail", f"{o.endpoint} refused the session: {_short(exc)}",
                      f"check the user:password in {o.auth_file}")]
    checks = [Check("oned reachable", "ok", f"{o.endpoint} answers (OpenNebula {version})"),
              _version_check(version), _user_check(server)]
    return [*checks, _hook_check(server)]


def _version_check(version: str) -> Check:
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return Check("oned version", "warn", f"cannot read version {version!r}")
    if (major, minor) < OLDEST_SUPPORTED:
        return Check("oned version", "fail", f"OpenNebula {version} is older than oneha supports "
                     f"({'.'.join(map(str, OLDEST_SUPPORTED))})", "upgrade OpenNebula")
    if major > NEWEST_TESTED_MAJOR:
        return Check("oned version", "warn", f"OpenNebula {version} is newer than oneha was tested with "
                     f"({NEWEST_TESTED_MAJOR}.x)", "run a drill with worker.dry_run first")
    return Check("oned version", "ok", f"{version} supported")


def _user_check(server: Any) -> Check:
    try:
        user = server.user.info(-1)
    except Exception as exc:
        return Check("oned credentials", "fail", f"one.user.info: {_short(exc)}", "check the oned user")
    groups = {int(g) for g in getattr(getattr(user, "GROUPS", None), "ID", []) or []}
    if 0 not in groups:
        return Check("oned credentials", "warn", f"accepted as {user.NAME} (not in the oneadmin group)",
                     "oneha needs to read every host and VM and recover them: use oneadmin or an admin user")
    return Check("oned credentials", "ok", f"accepted as {user.NAME} (oneadmin group)")


def _hook_check(server: Any) -> Check:
    """OpenNebula's own host_error hook (ft/host_error.rb) must not run beside oneha: both would act on the VMs."""
    try:
        pool = server.hookpool.info(-2, -1, -1)
    except Exception as exc:
        return Check("OpenNebula host_error hook", "warn", f"one.hookpool.info: {_short(exc)}",
                     "check by hand with `onehook list`")
    theirs, ours = [], []
    for hook in pool.HOOK or []:
        command = str(_template(hook).get("COMMAND", ""))
        if "oneha" in command:
            ours.append(int(hook.ID))
        elif "host_error" in command:
            theirs.append(f"{hook.ID} ({hook.NAME})")
    if theirs:
        return Check("OpenNebula host_error hook", "fail", f"registered: hook {', '.join(theirs)}; it would recover "
                     "the same VMs as oneha", "`onehook delete ID` (see docs/operations.md)")
    bridge = f"{len(ours)} oneha-bridge hook(s) registered" if ours else "no oneha-bridge hook (ZeroMQ only)"
    return Check("OpenNebula host_error hook", "ok", f"absent; {bridge}")


def _template(hook: Any) -> dict[str, Any]:
    tmpl = getattr(hook, "TEMPLATE", None)
    # pyone gives a hook's TEMPLATE (xs:anyType) as a dict
    return dict(tmpl) if isinstance(tmpl, dict) else {"COMMAND": getattr(tmpl, "COMMAND", "")}


# -- Redis and broker --------------------------------------------------------------------------------------------

def redis_check(name: str, settings: RedisSettings, what: str) -> Check:
    import redis

    from oneha import redisconn

    url = settings.url
    client = redisconn.client(settings.model_copy(update={
        "socket_timeout_s": min(settings.socket_timeout_s, TIMEOUT_S),
        "connect_timeout_s": min(settings.connect_timeout_s, TIMEOUT_S)}))
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check(name, "fail", f"{_no_password(url)} ({what}): {_short(exc)}", "start Redis or fix the URL")
    finally:
        client.close()
    return Check(name, "ok", f"{_no_password(url)} answers ({what})")


def broker_check(settings: Settings) -> Check:
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        return redis_check("broker", settings.broker_redis(), "Celery broker")
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=TIMEOUT_S,
                        transport_options={"master_name": settings.broker.sentinel_master}) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
    except Exception as exc:
        return Check("broker", "fail", f"{_no_password(url)}: {_short(exc)}", "start the broker or fix broker.url")
    return Check("broker", "ok", f"{_no_password(url)} answers (Celery broker)")


def _no_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


# -- fencing -----------------------------------------------------------------------------------------------------

def fencing_checks(settings: Settings) -> list[Check]:
    policies: list[tuple[str, ClusterPolicy]] = [("default", settings.policy.default)]
    policies += [(f"cluster {cid}", settings.policy.for_cluster(cid)) for cid in sorted(settings.policy.clusters)]
    return [_fence_check(name, policy) for name, policy in policies]


def _fence_check(name: str, policy: ClusterPolicy) -> Check:
    label = f"fencing ({name})"
    if policy.fencing is None:
        return Check(label, "fail", "not configured: no VM of a failed host will be recovered (fail closed)",
                     'set policy fencing = ["/opt/oneha/fence/fence_ipmi.sh"] or fencing = "none" on purpose')
    if policy.fencing == "none":
        return Check(label, "warn", '"none": VMs are recovered without powering their host off',
                     "only with storage-level fencing you trust")
    program = policy.fencing[0]
    found = program if os.sep in program else shutil.which(program)
    if not found or not os.path.isfile(found):
        return Check(label, "fail", f"{program} does not exist", "install the fence script (oneha deploy install)")
    if not os.access(found, os.X_OK):
        return Check(label, "fail", f"{found} is not executable", f"chmod 0755 {found}")
    return Check(label, "ok", f"{found} present and executable")


# -- metrics ports -----------------------------------------------------------------------------------------------

def metrics_port_checks(settings: Settings) -> list[Check]:
    ports = [("subscriber", settings.subscriber.metrics_bind, settings.subscriber.metrics_port),
             ("worker", settings.worker.metrics_bind, settings.worker.metrics_port)]
    return [_port_check(f"metrics port ({who})", bind, port) for who, bind, port in ports if port]


def _port_check(name: str, bind: str, port: int) -> Check:
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as sock:
        try:
            sock.bind((bind, port))
            return Check(name, "ok", f"{bind}:{port} free")
        except OSError as exc:
            busy = exc
    if _serves_oneha_metrics(bind, port):
        return Check(name, "ok", f"{bind}:{port} in use by a running oneha process")
    return Check(name, "warn", f"{bind}:{port} taken by another program ({busy.strerror})",
                 "choose another metrics_port (metrics only; recovery works without)")


def _serves_oneha_metrics(bind: str, port: int) -> bool:
    host = f"[{bind}]" if ":" in bind else bind
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
            return b"oneha_" in resp.read(1 << 20)
    except OSError:
        return False


# -- detection (issue 13) ----------------------------------------------------------------------------------------

def detection_checks(settings: Settings) -> list[Check]:
    """Are enough detectors alive for a quorum, and what do the hosts' heartbeats promise? Warnings only: without
    detection, oned's ERROR path still recovers (minutes later)."""
    return [_detectors_check(settings), _heartbeats_check(settings)]


def _detectors_check(settings: Settings) -> Check:
    import redis

    from oneha import redisconn
    from oneha.keys import Keys

    quorum = settings.detect.quorum
    try:
        client = redisconn.client(settings.redis)
        keys = Keys(settings.redis.key_prefix)
        names = [str(i) for i in client.smembers(keys.detect_instances)]
        alive = sorted(i for i in names if client.exists(keys.detect_view(i)))
    except (redis.RedisError, OSError) as exc:
        return Check("detectors", "warn", f"cannot tell ({_short(exc)})")
    if len(alive) >= quorum:
        return Check("detectors", "ok", f"{len(alive)} alive ({', '.join(alive)}), quorum {quorum}")
    return Check("detectors", "warn", f"{len(alive)} alive{' (' + ', '.join(alive) + ')' if alive else ''}, quorum "
                 f"{quorum}: no fast detection, oned's ERROR path only",
                 "run `oneha detect` on at least detect.quorum machines (docs/operations.md §1a)")


def _heartbeats_check(settings: Settings) -> Check:
    from oneha.detect.heartbeats import read
    from oneha.timing_rule import DETECTOR_FILE, fits

    d = settings.detect
    if d.heartbeat_dir is None:
        return Check("host heartbeats", "warn", "detect.heartbeat_dir unset: only a BMC can prove a host dead",
                     "install `oneha agent` on the hypervisors (docs/agent.md)")
    if not d.heartbeat_dir.is_dir():
        return Check("host heartbeats", "warn", f"{d.heartbeat_dir} is not a directory here (not mounted?)")
    proving: list[str] = []
    other: list[str] = []
    for path in sorted(d.heartbeat_dir.iterdir())[:10_000]:
        if path.name.startswith(".") or path.name == DETECTOR_FILE or not path.is_file():
            continue
        hb = read(path)  # the detector's own bounded read
        if hb is None:
            other.append(f"{path.name} (unreadable)")
            continue
        ok = hb.proves_self_fence and fits(hb.deadline_s, d.heartbeat_stale_s, d.heartbeat_margin_s)
        (proving if ok else other).append(path.name if ok else f"{path.name} ({hb.status})")
    detail = f"{len(proving)} host(s) whose heartbeat can prove death"
    if other:
        return Check("host heartbeats", "warn", f"{detail}; not: {', '.join(other[:8])}",
                     "an agent that is unarmed, stopped or without a watchdog promises nothing (docs/agent.md)")
    return Check("host heartbeats", "ok", detail)


# -- ZeroMQ ------------------------------------------------------------------------------------------------------

def zmq_checks(endpoints: list[str], wait_s: float) -> list[Check]:
    return [_zmq_check(endpoint, wait_s) for endpoint in endpoints]


def _zmq_check(endpoint: str, wait_s: float) -> Check:
    """Connected (the socket monitor saw the TCP connection) and, if any frame came within `wait_s`, publishing."""
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"EVENT ")
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + wait_s
        connected = _poll_until(deadline, lambda t: monitor.poll(t) != 0)
        if not connected:
            return Check(f"ZeroMQ {endpoint}", "warn", f"no connection within {wait_s:.0f} s",
                         "check one_hm's -b/-p in oned.conf (HM_MAD) or subscriber.zmq_endpoints; the reconciler "
                         "still finds failures, later")
        frames = _poll_until(deadline, lambda t: sock.poll(t) != 0)
        seen = "an event received" if frames else f"connected, no event within {wait_s:.0f} s (normal when quiet)"
        return Check(f"ZeroMQ {endpoint}", "ok", seen)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def _poll_until(deadline: float, ready: Callable[[int], bool]) -> bool:
    return any(ready(timeout_ms) for timeout_ms in _remaining_ms(deadline))


def _remaining_ms(deadline: float) -> Iterator[int]:
    while (left := deadline - time.monotonic()) > 0:
        yield max(1, int(left * 1000))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
