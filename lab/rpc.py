"""oned's XML-RPC API over the lab model, plus the lab.* fault-injection methods, at http://<bind>:<port>/RPC2.

Replies follow oned (REFERENCE §4; `RequestXRPC::make_response`, src/rm/xml-rpc/RequestXRPC.cc): `[True, body_or_id,
0]` or `[False, "[method] message", code, object id, replication index]` (the lab has no Raft log: index 0). Arguments
are checked against each method's signature first, so wrong types or missing arguments get an RPC_API (0x1000)
error instead of a traceback; an unknown method gets an XML-RPC fault as xmlrpc-c gives (-506). lab.* methods use
the same reply convention, so a client tells errors apart the same way.
"""

from __future__ import annotations

import random
import socketserver
import threading
import time
import xmlrpc.client
from collections import Counter, deque
from collections.abc import Callable
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from oneha.lab import xmlwriter
from oneha.lab.cloud import Cloud
from oneha.lab.events import EventPublisher
from oneha.lab.model import LabError, Vm
from oneha.opennebula import ErrorCode, VmState

Reply = list[Any]

# name -> (required argument types after the session, optional ones). bool is checked apart from int, since
# XML-RPC keeps them distinct and oned's xmlrpc-c rejects one for the other.
SIGNATURES: dict[str, tuple[tuple[type, ...], tuple[type, ...]]] = {
    "one.hostpool.info": ((), (int, int, int)),
    "one.host.info": ((int,), (bool,)),
    "one.host.status": ((int, int), ()),
    "one.vmpool.info": ((int, int, int, int), (str,)),  # the Ruby OCA appends a filter string
    "one.vmpool.infoextended": ((int, int, int, int), (str,)),
    "one.vmpool.infoset": ((str, bool), ()),
    "one.vm.info": ((int,), (bool,)),
    "one.vm.action": ((str, int), ()),
    "one.vm.recover": ((int, int), ()),
    "one.vm.migrate": ((int, int, bool), (bool, int, int)),
    "one.vm.deploy": ((int, int), (bool, int, str)),
    "one.datastorepool.info": ((), (int, int, int)),
    "one.clusterpool.info": ((), (int, int, int)),
    "one.system.version": ((), ()),
    "one.system.config": ((), ()),
    # src/rm/xml-rpc/UserXRPC.h ("A:sib"; -1 = the caller) and HookXRPC.h ("A:siii": filter, start, end).
    "one.user.info": ((int,), (bool,)),
    "one.hookpool.info": ((int, int, int), ()),
    "lab.hook.create": ((dict,), ()),
    "lab.host.kill": ((int,), ()),
    "lab.host.partition": ((int,), ()),
    "lab.host.revive": ((int,), ()),
    "lab.host.fence": ((int,), ()),
    "lab.host.fail": ((int, str), (bool,)),  # issue 12: a failure mode of lab/hostside.py (needs the host side)
    "lab.host.restore": ((int,), ()),
    "lab.vm.crash": ((int,), (str,)),
    "lab.vm.fail": ((int,), (str, bool)),
    "lab.vm.create": ((dict,), ()),
    "lab.faults": ((), (dict,)),
    "lab.oracle": ((), (float,)),
    "lab.deploys": ((), (float,)),  # the log of deploys: [{t, by: api|scheduler, call, vm, host, error}]
    "lab.stats": ((), (bool,)),
    "lab.calls": ((), (bool,)),
}

# The calls `lab.calls` lists, in the order they were answered: every call that changes a host or a VM, and the
# host reads that may confirm such a change (tests check the order oneha's calls reach oned in, e.g. a host set
# OFFLINE and read back before any VM of it is recovered). VM reads are left out: they are most of the traffic.
LOGGED_CALLS = frozenset({"one.host.status", "one.host.info", "one.vm.action", "one.vm.recover", "one.vm.deploy",
                          "one.vm.migrate"})
CALL_LOG_SIZE = 20_000

ONED_VERSION = "7.4.0"


class Faults:
    """Knobs applied to one.* calls. `hang` blocks calls until it is cleared (or the server stops); `hang_methods`
    blocks only those methods, by name, until cleared with `{"hang_methods": []}`: a call oned keeps while it
    answers everything else (it then applies it: oned runs a call to its end, `RequestManagerXRPC.cc`)."""

    def __init__(self, seed: int = 0) -> None:
        self.latency_ms = 0.0
        self.error_rate = 0.0
        self.event_drop_rate = 0.0
        self.event_reorder_rate = 0.0
        self.released = threading.Event()
        self.released.set()
        self.hang_methods: frozenset[str] = frozenset()
        self.methods_released = threading.Event()
        self.methods_released.set()
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self.lock = threading.Lock()

    @property
    def hang(self) -> bool:
        return not self.released.is_set()

    def as_dict(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "error_rate": self.error_rate, "event_drop_rate": self.event_drop_rate,
                "event_reorder_rate": self.event_reorder_rate, "hang": self.hang,
                "hang_methods": sorted(self.hang_methods)}

    def update(self, knobs: dict[str, Any]) -> None:
        for name in ("latency_ms", "error_rate", "event_drop_rate", "event_reorder_rate"):
            if name in knobs:
                value = knobs[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise LabError(ErrorCode.XML_RPC_API, f"{name} must be a non-negative number")
                setattr(self, name, float(value))
        unknown = set(knobs) - {"latency_ms", "error_rate", "event_drop_rate", "event_reorder_rate", "hang",
                                "hang_methods"}
        if unknown:
            raise LabError(ErrorCode.XML_RPC_API, f"unknown fault knobs: {sorted(unknown)}")
        if "hang" in knobs:
            (self.released.clear if knobs["hang"] else self.released.set)()
        if "hang_methods" in knobs:
            self.hang_methods = frozenset(str(m) for m in knobs["hang_methods"])
            (self.methods_released.clear if self.hang_methods else self.methods_released.set)()

    def roll_error(self) -> bool:
        with self.lock:
            return self.error_rate > 0 and self.rng.random() < self.error_rate


class Stats:
    """Calls per method and the most one.* calls in flight at once (oneha must cap its concurrency)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.seq = 0
        self.log: deque[list[Any]] = deque(maxlen=CALL_LOG_SIZE)

    def answered(self, method: str, args: tuple[Any, ...], reply: Any) -> None:
        """Log a LOGGED_CALLS call as answered: [seq, monotonic time, method, args, ok, STATE read by host.info or
        -1] (no None: XML-RPC cannot carry it)."""
        ok = isinstance(reply, list) and bool(reply) and reply[0] is True
        state = -1
        if ok and method == "one.host.info" and "<STATE>" in str(reply[1]):
            state = int(str(reply[1]).split("<STATE>", 1)[1].split("<", 1)[0])
        plain = [a for a in args if isinstance(a, int | str) and not isinstance(a, bool)][:3]
        with self.lock:
            self.seq += 1
            self.log.append([self.seq, time.monotonic(), method, plain, ok, state])

    def call_log(self, reset: bool) -> list[list[Any]]:
        with self.lock:
            out = list(self.log)
            if reset:
                self.log.clear()
        return out

    def enter(self, method: str) -> None:
        with self.lock:
            self.calls[method] += 1
            if method.startswith("one."):
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, method: str) -> None:
        if method.startswith("one."):
            with self.lock:
                self.in_flight -= 1

    def as_dict(self, reset: bool) -> dict[str, Any]:
        with self.lock:
            out = {"calls": dict(self.calls), "max_concurrent": self.max_in_flight, "in_flight": self.in_flight,
                   "total_one_calls": sum(n for m, n in self.calls.items() if m.startswith("one."))}
            if reset:
                self.calls.clear()
                self.max_in_flight = self.in_flight
        return out


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a lab under load would flood stderr


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class LabRpc:
    """The API: checks the session and arguments, applies faults, dispatches to the model."""

    def __init__(self, cloud: Cloud, session: str, faults: Faults, stats: Stats,
                 events: EventPublisher | None, tick_errors: Callable[[], int] = lambda: 0) -> None:
        self.cloud = cloud
        self.tick_errors = tick_errors
        self.session = session
        self.faults = faults
        self.stats = stats
        self.events = events
        self.hooks: list[dict[str, str]] = []  # registered with lab.hook.create, read with one.hookpool.info
        self.host_side: Any = None  # lab.hostside.HostSide, set by LabCloud when it runs one
        self.handlers: dict[str, Callable[..., Any]] = {
            "one.hostpool.info": self.hostpool_info, "one.host.info": self.host_info,
            "one.host.status": _ack(lambda hid, status: cloud.host_status(hid, status), "hid"),
            "one.vmpool.info": self.vmpool_info, "one.vmpool.infoextended": self.vmpool_info_extended,
            "one.vmpool.infoset": self.vmpool_infoset, "one.vm.info": self.vm_info,
            "one.vm.action": _ack(lambda action, vid: cloud.vm_action(action, vid), "vid"),
            "one.vm.recover": _ack(lambda vid, op: cloud.vm_recover(vid, op), "vid"),
            "one.vm.migrate": _ack(lambda vid, hid, live, *_: cloud.vm_migrate(vid, hid, live), "vid"),
            "one.vm.deploy": _ack(lambda vid, hid, enforce=False, *_: cloud.vm_deploy(vid, hid, enforce), "vid"),
            "one.datastorepool.info": self.datastorepool_info, "one.clusterpool.info": self.clusterpool_info,
            "one.system.version": lambda: ONED_VERSION, "one.system.config": self.system_config,
            "lab.host.kill": _ack(lambda hid: cloud.host_kill(hid), "hid"),
            "lab.host.partition": _ack(lambda hid: cloud.host_partition(hid), "hid"),
            "lab.host.revive": _ack(lambda hid: cloud.host_revive(hid), "hid"),
            "lab.host.fence": _ack(lambda hid: cloud.host_fence(hid), "hid"),
            "lab.vm.crash": _ack(lambda vid, reason="missing": cloud.vm_crash(vid, reason), "vid"),
            "lab.host.fail": _ack(lambda hid, mode, bmc=True: self.host_fail(hid, mode, bmc), "hid"),
            "lab.host.restore": _ack(lambda hid: self.host_fail(hid, "restore", True), "hid"),
            "lab.vm.fail": _ack(lambda vid, name="BOOT_FAILURE", sticky=False: cloud.vm_fail(vid, name, sticky), "vid"),
            "one.user.info": self.user_info, "one.hookpool.info": self.hookpool_info,
            "lab.hook.create": self.hook_create,
            "lab.vm.create": cloud.create_vm, "lab.faults": self.set_faults,
            "lab.oracle": lambda since=0.0: cloud.oracle(since), "lab.stats": self.get_stats,
            "lab.calls": lambda reset=False: self.stats.call_log(reset),
            "lab.deploys": lambda since=0.0: cloud.calls_since(since),
        }

    # -- dispatch ------------------------------------------------------------------------------------------------

    def dispatch(self, method: str, params: tuple[Any, ...]) -> Reply:
        if method not in self.handlers:
            raise xmlrpc.client.Fault(-506, f"Method '{method}' not defined")
        self.stats.enter(method)
        try:
            reply = self._call(method, params)
            if method in LOGGED_CALLS:
                self.stats.answered(method, params[1:], reply)
            return reply
        finally:
            self.stats.leave(method)

    def _call(self, method: str, params: tuple[Any, ...]) -> Reply:
        if not params or not isinstance(params[0], str):
            return _error(method, ErrorCode.XML_RPC_API, "Incorrect parameters: the session string is missing", -1)
        if params[0] != self.session:
            return _error(method, ErrorCode.AUTHENTICATION, "User couldn't be authenticated, aborting call.", -1)
        args = params[1:]
        problem = _check_args(method, args)
        if problem:
            return _error(method, ErrorCode.XML_RPC_API, problem, _first_int(args))
        if method.startswith("one."):
            if method in self.faults.hang_methods:
                self.faults.methods_released.wait()
            failed = self._inject_faults()
            if failed:
                return _error(method, ErrorCode.INTERNAL, failed, _first_int(args))
        try:
            return [True, self.handlers[method](*args), 0]
        except LabError as exc:
            return _error(method, exc.code, exc.message, exc.obj_id if exc.obj_id >= 0 else _first_int(args))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # e.g. a lab.vm.create struct with a wrongly typed member: a bad request, not a dead server
            return _error(method, ErrorCode.XML_RPC_API, f"Incorrect parameters: {exc}", _first_int(args))

    def _inject_faults(self) -> str | None:
        self.faults.released.wait()
        if self.faults.latency_ms > 0:
            time.sleep(self.faults.latency_ms / 1000.0)  # injected latency: the only sleep in request handling
        if self.faults.roll_error():
            return "Internal error (injected by lab.faults error_rate)"
        return None

    # -- one.* ---------------------------------------------------------------------------------------------------

    def hostpool_info(self, *_: int) -> str:
        with self.cloud.lock:
            return xmlwriter.host_pool_xml(self.cloud)

    def host_info(self, hid: int, decrypt: bool = False) -> str:
        with self.cloud.lock:
            return xmlwriter.host_xml(self.cloud, self.cloud.get_host(hid))

    def vm_info(self, vid: int, decrypt: bool = False) -> str:
        with self.cloud.lock:
            return xmlwriter.vm_xml(self.cloud, self.cloud.get_vm(vid), full=True)

    def vmpool_info(self, filt: int, start: int, end: int, state: int, _query: str = "") -> str:
        return self._vmpool(filt, start, end, state, full=False)

    def vmpool_info_extended(self, filt: int, start: int, end: int, state: int, _query: str = "") -> str:
        return self._vmpool(filt, start, end, state, full=True)

    def _vmpool(self, filt: int, start: int, end: int, state: int, full: bool) -> str:
        if state < -2 or state > 11:
            raise LabError(ErrorCode.XML_RPC_API, f"Incorrect filter_flag, state {state}")
        with self.cloud.lock:
            # Every lab VM belongs to oneadmin (uid 0): -2 all, -3 mine, -1 mine and my groups, 0 = uid 0.
            vms = list(self.cloud.vms.values()) if filt in (-3, -2, -1, 0) else []
            selected = [v for v in vms if _in_range(v.id, start, end) and _state_matches(v, state)]
            return xmlwriter.vm_pool_xml(self.cloud, selected, full)

    def vmpool_infoset(self, ids: str, extended: bool) -> str:
        try:
            wanted = [int(part) for part in ids.split(",") if part.strip()]
        except ValueError:
            raise LabError(ErrorCode.XML_RPC_API, f"Incorrect ID set: {ids[:80]!r}") from None
        with self.cloud.lock:
            vms = [self.cloud.vms[i] for i in sorted(set(wanted)) if i in self.cloud.vms]
            return xmlwriter.vm_pool_xml(self.cloud, vms, extended)

    def datastorepool_info(self, *_: int) -> str:
        with self.cloud.lock:
            return xmlwriter.datastore_pool_xml(self.cloud)

    def clusterpool_info(self, *_: int) -> str:
        with self.cloud.lock:
            return xmlwriter.cluster_pool_xml(self.cloud)

    def system_config(self) -> str:
        # oned.conf as XML; MONITORING_INTERVAL_HOST is gone since 5.12 (REFERENCE §1), so it is not here either.
        return ("<OPENNEBULA_CONFIGURATION><DEFAULT_UMASK>177</DEFAULT_UMASK><MANAGER_TIMER>15</MANAGER_TIMER>"
                "<PORT>2633</PORT><VM_SUBMIT_ON_HOLD>NO</VM_SUBMIT_ON_HOLD>"
                "<HM_MAD><EXECUTABLE>one_hm</EXECUTABLE><ARGUMENTS>-p 2101 -l 2102 -b 127.0.0.1</ARGUMENTS>"
                "</HM_MAD></OPENNEBULA_CONFIGURATION>")

    def user_info(self, uid: int, decrypt: bool = False) -> str:
        # The lab's one user is the session's; -1 means the caller (UserInfoAPI), 0 is oneadmin.
        if uid not in (-1, 0):
            raise LabError(ErrorCode.NO_EXISTS, f"Error getting user [{uid}].", uid)
        return xmlwriter.user_xml(0, self.session.split(":", 1)[0])

    def hookpool_info(self, filt: int, start: int, end: int) -> str:
        with self.cloud.lock:
            return xmlwriter.hook_pool_xml([h for h in self.hooks if _in_range(int(h["ID"]), start, end)])

    # -- lab.* ---------------------------------------------------------------------------------------------------

    def hook_create(self, hook: dict[str, Any]) -> int:
        """Register a hook as `onehook create` would (NAME, TYPE and template attributes such as COMMAND,
        RESOURCE, STATE); the lab never runs it. Returns its ID."""
        attrs = {str(k).upper(): str(v) for k, v in hook.items()}
        if not {"NAME", "TYPE", "COMMAND"} <= attrs.keys():
            raise LabError(ErrorCode.XML_RPC_API, "a hook needs NAME, TYPE and COMMAND", -1)
        with self.cloud.lock:
            hid = len(self.hooks)
            self.hooks.append({**attrs, "ID": str(hid)})
        return hid

    def host_fail(self, hid: int, mode: str, bmc_reachable: bool) -> None:
        """lab.host.fail / lab.host.restore: a failure mode played on every signal of the host side."""
        if self.host_side is None:
            raise LabError(ErrorCode.XML_RPC_API, "this lab runs without a host side (oneha lab sim --host-side)")
        self.cloud.get_host(hid)
        if mode == "restore":
            self.host_side.restore(hid)
            return
        try:
            self.host_side.fail(hid, mode, bmc_reachable)
        except ValueError as exc:
            raise LabError(ErrorCode.XML_RPC_API, str(exc), hid) from None

    def set_faults(self, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
        knobs = dict(knobs or {})
        # lcm_ignore: the next N LCM-level calls are accepted and change nothing (lab/state.py); host_status_ignore:
        # the next N one.host.status calls answer success and change nothing (`HostAPI::status` never checks what
        # `hpool->update` returned, src/rm/api/HostAPI.cc: a failed write still answers SUCCESS).
        for name in ("lcm_ignore", "host_status_ignore"):
            if name in knobs:
                value = knobs.pop(name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise LabError(ErrorCode.XML_RPC_API, f"{name} must be a non-negative integer")
                with self.cloud.lock:
                    setattr(self.cloud, name, value)
        if knobs:
            self.faults.update(knobs)
            if self.events is not None:
                self.events.drop_rate = self.faults.event_drop_rate
                self.events.reorder_rate = self.faults.event_reorder_rate
        with self.cloud.lock:
            return {**self.faults.as_dict(), "lcm_ignore": self.cloud.lcm_ignore,
                    "host_status_ignore": self.cloud.host_status_ignore}

    def get_stats(self, reset: bool = False) -> dict[str, Any]:
        out = self.stats.as_dict(reset)
        with self.cloud.lock:
            out["lcm_ignored"] = self.cloud.lcm_ignored
        out["tick_errors"] = self.tick_errors()
        if self.events is not None:
            out["events_sent"] = self.events.sent
            out["events_dropped"] = self.events.dropped
            out["events_reordered"] = self.events.reordered
        return out


def _ack(action: Callable[..., None], id_name: str) -> Callable[..., int]:
    """oned answers an action with the ID of the object acted on."""
    position = action.__code__.co_varnames.index(id_name)

    def run(*args: Any) -> int:
        action(*args)
        return int(args[position])

    return run


def _check_args(method: str, args: tuple[Any, ...]) -> str | None:
    required, optional = SIGNATURES[method]
    if len(args) < len(required) or len(args) > len(required) + len(optional):
        return (f"Incorrect parameters: {method} takes {len(required)} to {len(required) + len(optional)} "
                f"arguments after the session, got {len(args)}")
    for i, (arg, kind) in enumerate(zip(args, required + optional, strict=False)):
        ok = isinstance(arg, bool) if kind is bool else (
            isinstance(arg, int | float) and not isinstance(arg, bool) if kind is float else
            isinstance(arg, kind) and not (kind is int and isinstance(arg, bool)))
        if not ok:
            return f"Incorrect parameter {i + 1}: expected {kind.__name__}, got {type(arg).__name__}"
    return None


def _first_int(args: tuple[Any, ...]) -> int:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool):
            return arg
    return -1


def _error(method: str, code: ErrorCode, message: str, obj_id: int) -> Reply:
    """oned 7.4's failure: [False, message, code, -1, -1]; a missing object's id in the 4th element (seen on a real
    oned: `[False, '[one.vm.deploy] Error getting virtual machine [99].', 1024, 99, -1]`)."""
    return [False, f"[{method}] {message}", int(code), obj_id if code == ErrorCode.NO_EXISTS else -1, -1]


def _in_range(vid: int, start: int, end: int) -> bool:
    return (start < 0 or vid >= start) and (end < 0 or vid <= end)


def _state_matches(vm: Vm, state: int) -> bool:
    if state == -2:
        return True
    if state == -1:
        return vm.state != VmState.DONE
    return int(vm.state) == state


class RpcServer:
    """The threaded HTTP server. `port=0` picks a free port; `.port` tells which."""

    def __init__(self, api: LabRpc, bind: str = "127.0.0.1", port: int = 2633) -> None:
        self.api = api
        self.server = _Server((bind, port), requestHandler=_Handler, logRequests=False, allow_none=False)
        self.server._dispatch = api.dispatch  # type: ignore[method-assign,assignment]
        self.port = int(self.server.server_address[1])
        self.url = f"http://{bind}:{self.port}/RPC2"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="lab-rpc", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.api.faults.released.set()  # let hung calls finish
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
