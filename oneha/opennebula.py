"""OpenNebula domain knowledge shared by the subscriber, the workers and the lab.

States and error codes (REFERENCE §3-4, `include/VirtualMachine.h`, `include/Host.h`), the safe decoder for
hook-manager events and hook `$TEMPLATE` arguments (REFERENCE §2, `src/hm/HookStateHost.cc`,
`src/hm/HookStateVM.cc`), small immutable views of hosts and VMs, and the pyone client with real timeouts
(REFERENCE §5). The lab's XML *writer* deliberately does not live here: it must not share code with this parser.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import xmlrpc.client
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, TypeAlias

from lxml import etree

XmlElement: TypeAlias = Any  # lxml.etree._Element: lxml ships no type stubs


class HostState(IntEnum):
    INIT = 0
    MONITORING_MONITORED = 1
    MONITORED = 2
    ERROR = 3
    DISABLED = 4
    MONITORING_ERROR = 5
    MONITORING_INIT = 6
    MONITORING_DISABLED = 7
    OFFLINE = 8


# MONITORING_ERROR only exists up to 5.10, where it means the same as ERROR (REFERENCE §3).
HOST_FAILED_STATES = frozenset({HostState.ERROR, HostState.MONITORING_ERROR})
HOST_HEALTHY_STATES = frozenset({HostState.MONITORED, HostState.MONITORING_MONITORED})
HOST_OPERATOR_STATES = frozenset({HostState.DISABLED, HostState.OFFLINE, HostState.MONITORING_DISABLED})


class VmState(IntEnum):
    INIT = 0
    PENDING = 1
    HOLD = 2
    ACTIVE = 3
    STOPPED = 4
    SUSPENDED = 5
    DONE = 6
    FAILED = 7
    POWEROFF = 8
    UNDEPLOYED = 9
    CLONING = 10
    CLONING_FAILURE = 11


class LcmState(IntEnum):
    """LCM_STATE, meaningful when STATE is ACTIVE."""

    LCM_INIT = 0
    PROLOG = 1
    BOOT = 2
    RUNNING = 3
    MIGRATE = 4
    SAVE_STOP = 5
    SAVE_SUSPEND = 6
    SAVE_MIGRATE = 7
    PROLOG_MIGRATE = 8
    PROLOG_RESUME = 9
    EPILOG_STOP = 10
    EPILOG = 11
    SHUTDOWN = 12
    CANCEL = 13
    FAILURE = 14
    CLEANUP_RESUBMIT = 15
    UNKNOWN = 16
    HOTPLUG = 17
    SHUTDOWN_POWEROFF = 18
    BOOT_UNKNOWN = 19
    BOOT_POWEROFF = 20
    BOOT_SUSPENDED = 21
    BOOT_STOPPED = 22
    CLEANUP_DELETE = 23
    HOTPLUG_SNAPSHOT = 24
    HOTPLUG_NIC = 25
    HOTPLUG_SAVEAS = 26
    HOTPLUG_SAVEAS_POWEROFF = 27
    HOTPLUG_SAVEAS_SUSPENDED = 28
    SHUTDOWN_UNDEPLOY = 29
    EPILOG_UNDEPLOY = 30
    PROLOG_UNDEPLOY = 31
    BOOT_UNDEPLOY = 32
    HOTPLUG_PROLOG_POWEROFF = 33
    HOTPLUG_EPILOG_POWEROFF = 34
    BOOT_MIGRATE = 35
    BOOT_FAILURE = 36
    BOOT_MIGRATE_FAILURE = 37
    PROLOG_MIGRATE_FAILURE = 38
    PROLOG_FAILURE = 39
    EPILOG_FAILURE = 40
    EPILOG_STOP_FAILURE = 41
    EPILOG_UNDEPLOY_FAILURE = 42
    PROLOG_MIGRATE_POWEROFF = 43
    PROLOG_MIGRATE_POWEROFF_FAILURE = 44
    PROLOG_MIGRATE_SUSPEND = 45
    PROLOG_MIGRATE_SUSPEND_FAILURE = 46
    BOOT_UNDEPLOY_FAILURE = 47
    BOOT_STOPPED_FAILURE = 48
    PROLOG_RESUME_FAILURE = 49
    PROLOG_UNDEPLOY_FAILURE = 50
    DISK_SNAPSHOT_POWEROFF = 51
    DISK_SNAPSHOT_REVERT_POWEROFF = 52
    DISK_SNAPSHOT_DELETE_POWEROFF = 53
    DISK_SNAPSHOT_SUSPENDED = 54
    DISK_SNAPSHOT_REVERT_SUSPENDED = 55
    DISK_SNAPSHOT_DELETE_SUSPENDED = 56
    DISK_SNAPSHOT = 57
    DISK_SNAPSHOT_REVERT = 58
    DISK_SNAPSHOT_DELETE = 59
    PROLOG_MIGRATE_UNKNOWN = 60
    PROLOG_MIGRATE_UNKNOWN_FAILURE = 61
    DISK_RESIZE = 62
    DISK_RESIZE_POWEROFF = 63
    DISK_RESIZE_UNDEPLOYED = 64
    HOTPLUG_NIC_POWEROFF = 65
    HOTPLUG_RESIZE = 66
    HOTPLUG_SAVEAS_UNDEPLOYED = 67
    HOTPLUG_SAVEAS_STOPPED = 68
    BACKUP = 69
    BACKUP_POWEROFF = 70
    RESTORE = 71

FAILURE_LCM_STATES = frozenset(s for s in LcmState if s.name.endswith("_FAILURE"))

# States in which a VM is on its way to (another) host: it has left the failed host as far as oneha cares.
VM_IN_FLIGHT_LCM_STATES = frozenset(
    LcmState[n]
    for n in ("PROLOG", "BOOT", "PROLOG_MIGRATE", "PROLOG_MIGRATE_UNKNOWN", "BOOT_MIGRATE", "CLEANUP_RESUBMIT",
              "BOOT_UNKNOWN", "MIGRATE", "SAVE_MIGRATE", "CLEANUP_DELETE")
)


class ErrorCode(IntEnum):
    """oned's XML-RPC error codes (`include/Request.h`)."""

    SUCCESS = 0x0000
    AUTHENTICATION = 0x0100
    AUTHORIZATION = 0x0200
    NO_EXISTS = 0x0400
    ACTION = 0x0800
    XML_RPC_API = 0x1000
    INTERNAL = 0x2000
    ALLOCATE = 0x4000
    LOCKED = 0x8000
    REPLICATION = 0x10000


class HostStatus(IntEnum):
    """`one.host.status` codes (`src/rm/api/HostAPI.h`: ENABLED, DISABLED, OFFLINE); anything else is refused."""

    ENABLED = 0
    DISABLED = 1
    OFFLINE = 2


class RecoverOp(IntEnum):
    """`one.vm.recover` operations."""

    FAILURE = 0
    SUCCESS = 1
    RETRY = 2
    DELETE = 3
    DELETE_RECREATE = 4
    DELETE_DB = 5


# --------------------------------------------------------------------------------------------------------------
# Views: what oneha needs of a host or a VM, built from untrusted XML or from pyone objects.


def _int(text: str | None, default: int = -1) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class HostView:
    id: int
    name: str
    state: HostState
    cluster_id: int
    vm_ids: tuple[int, ...] = ()
    template: Mapping[str, str] = field(default_factory=dict)
    # HOST_SHARE (`HostShare::to_xml`, src/host/HostShare.cc): CPU in percent of a core (x100), memory in KB.
    # MAX_* already leave out RESERVED_CPU/MEM; USAGE is what oned has allocated to the VMs placed there.
    max_cpu: int = 0
    cpu_usage: int = 0
    max_mem: int = 0
    mem_usage: int = 0

    @property
    def free_cpu(self) -> int:
        return self.max_cpu - self.cpu_usage

    @property
    def free_mem(self) -> int:
        return self.max_mem - self.mem_usage

    @property
    def failed(self) -> bool:
        return self.state in HOST_FAILED_STATES

    @property
    def healthy(self) -> bool:
        return self.state in HOST_HEALTHY_STATES

    @classmethod
    def from_xml(cls, host: XmlElement) -> HostView:
        vms = host.find("VMS")
        ids = tuple(_int(e.text) for e in vms.findall("ID")) if vms is not None else ()
        return cls(
            id=_int(host.findtext("ID")),
            name=host.findtext("NAME") or "",
            state=_host_state(_int(host.findtext("STATE"))),
            cluster_id=_int(host.findtext("CLUSTER_ID")),
            vm_ids=ids,
            template=_flat_template(host.find("TEMPLATE")),
            **_share(lambda name: host.findtext(f"HOST_SHARE/{name}")),
        )

    @classmethod
    def from_pyone(cls, host: Any) -> HostView:
        vms = getattr(host, "VMS", None)
        ids = tuple(int(i) for i in (getattr(vms, "ID", None) or []))
        return cls(
            id=int(host.ID),
            name=str(host.NAME or ""),
            state=_host_state(int(host.STATE)),
            cluster_id=_int(str(host.CLUSTER_ID)),
            vm_ids=ids,
            template=_flat_dict(getattr(host, "TEMPLATE", None)),
            **_share(lambda name: _text(getattr(getattr(host, "HOST_SHARE", None), name, None))),
        )


# History record ACTION written when the *monitor* changed the VM's state (`include/VMActions.h` MONITOR_ACTION,
# "internal, monitoring process"). `LifeCycleManager::trigger_monitor_poweroff` (`src/lcm/LifeCycleStates.cc`) sets it,
# with uid/gid/request id -1, when the VM probe reports a RUNNING/UNKNOWN VM powered off or missing (MISSING_STATE,
# POWEROFF by default: `src/im/InformationManager.cc`, `src/im_mad/remotes/lib/probe_db.rb`). An operator's
# `onevm poweroff` writes POWEROFF (19) / POWEROFF_HARD (20) with the caller's uid instead, and a resume opens a new
# record with RESUME (11). So POWEROFF + last ACTION 44 = stopped without any API call. A guest that shuts itself
# down looks the same (its transient libvirt domain vanishes): oned records nothing that tells the two apart.
MONITOR_ACTION = 44


@dataclass(frozen=True, slots=True)
class VmView:
    id: int
    name: str
    state: VmState
    lcm_state: LcmState
    hid: int | None
    hostname: str | None
    ds_id: int | None
    cluster_id: int = -1  # CID of the last history record: the cluster of the host it was deployed on
    history_seq: int = -1  # SEQ of the last history record; changes with every (re)deployment
    resched: bool = False
    user_template: Mapping[str, str] = field(default_factory=dict)
    history_action: int = -1  # ACTION of the last history record (`include/VMActions.h` numbers)
    # TEMPLATE: its scalar attributes (CPU, MEMORY…), the names of its vector attributes (VMGROUP, PCI, TOPOLOGY,
    # NUMA_NODE, DISK…) and TOPOLOGY/PIN_POLICY. The short pool body has CPU/MEMORY/VCPU only: decisions that
    # depend on vectors need the whole body (`one.vm.info` or an extended pool read).
    template: Mapping[str, str] = field(default_factory=dict)
    template_vectors: frozenset[str] = frozenset()
    pin_policy: str = ""

    @property
    def cpu(self) -> int:
        """What the VM takes from a host's CPU_USAGE: CPU x 100 (`include/HostShareCapacity.h`)."""
        try:
            return int(float(self.template.get("CPU") or 0) * 100)
        except ValueError:
            return 0

    @property
    def mem(self) -> int:
        """What the VM takes from a host's MEM_USAGE, in KB: MEMORY (MB) x 1024 (`include/HostShareCapacity.h`)."""
        try:
            return int(float(self.template.get("MEMORY") or 0)) * 1024
        except ValueError:
            return 0

    @property
    def ha_opt_out(self) -> bool:
        return self.user_template.get("HA", "").strip().upper() in {"NO", "FALSE", "0", "OFF", "DISABLED"}

    @property
    def ha_priority(self) -> int:
        return _int(self.user_template.get("HA_PRIORITY"), 0)

    @property
    def unrequested_poweroff(self) -> bool:
        """POWEROFF, and nobody asked for it: see MONITOR_ACTION."""
        return self.state == VmState.POWEROFF and self.history_action == MONITOR_ACTION

    @property
    def state_name(self) -> str:
        if self.state == VmState.ACTIVE:
            return f"ACTIVE/{self.lcm_state.name}"
        return self.state.name

    @classmethod
    def from_xml(cls, vm: XmlElement) -> VmView:
        records = vm.findall("HISTORY_RECORDS/HISTORY")
        last = max(records, key=lambda h: _int(h.findtext("SEQ"))) if records else None
        return cls(
            id=_int(vm.findtext("ID")),
            name=vm.findtext("NAME") or "",
            state=_vm_state(_int(vm.findtext("STATE"))),
            lcm_state=_lcm_state(_int(vm.findtext("LCM_STATE"))),
            hid=_int(last.findtext("HID")) if last is not None else None,
            hostname=last.findtext("HOSTNAME") if last is not None else None,
            ds_id=_int(last.findtext("DS_ID")) if last is not None else None,
            cluster_id=_int(last.findtext("CID")) if last is not None else -1,
            history_seq=_int(last.findtext("SEQ")) if last is not None else -1,
            history_action=_int(last.findtext("ACTION")) if last is not None else -1,
            resched=vm.findtext("RESCHED") == "1",
            user_template=_flat_template(vm.find("USER_TEMPLATE")),
            template=_flat_template(vm.find("TEMPLATE")),
            template_vectors=_vector_names(vm.find("TEMPLATE")),
            pin_policy=(vm.findtext("TEMPLATE/TOPOLOGY/PIN_POLICY") or "").strip(),
        )

    @classmethod
    def from_pyone(cls, vm: Any) -> VmView:
        records = getattr(getattr(vm, "HISTORY_RECORDS", None), "HISTORY", None) or []
        last = max(records, key=lambda h: int(h.SEQ)) if records else None
        return cls(
            id=int(vm.ID),
            name=str(vm.NAME or ""),
            state=_vm_state(int(vm.STATE)),
            lcm_state=_lcm_state(int(vm.LCM_STATE)),
            hid=int(last.HID) if last is not None else None,
            hostname=str(last.HOSTNAME) if last is not None else None,
            ds_id=int(last.DS_ID) if last is not None else None,
            cluster_id=_int(str(last.CID)) if last is not None else -1,
            history_seq=int(last.SEQ) if last is not None else -1,
            history_action=_int(str(getattr(last, "ACTION", ""))) if last is not None else -1,
            resched=str(getattr(vm, "RESCHED", "0")) == "1",
            user_template=_flat_dict(getattr(vm, "USER_TEMPLATE", None)),
            **_pyone_template(getattr(vm, "TEMPLATE", None)),
        )


def _host_state(value: int) -> HostState:
    try:
        return HostState(value)
    except ValueError:
        return HostState.INIT


def _vm_state(value: int) -> VmState:
    try:
        return VmState(value)
    except ValueError:
        return VmState.INIT


def _lcm_state(value: int) -> LcmState:
    try:
        return LcmState(value)
    except ValueError:
        return LcmState(0)


def _flat_template(elem: XmlElement | None) -> dict[str, str]:
    """Top-level scalar attributes of a TEMPLATE / USER_TEMPLATE; vector attributes are skipped."""
    if elem is None:
        return {}
    return {child.tag: (child.text or "").strip() for child in elem if len(child) == 0}


def _vector_names(elem: XmlElement | None) -> frozenset[str]:
    return frozenset() if elem is None else frozenset(child.tag for child in elem if len(child) > 0)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _share(get: Callable[[str], str | None]) -> dict[str, int]:
    return {"max_cpu": _int(get("MAX_CPU"), 0), "cpu_usage": _int(get("CPU_USAGE"), 0),
            "max_mem": _int(get("MAX_MEM"), 0), "mem_usage": _int(get("MEM_USAGE"), 0)}


def _pyone_template(value: Any) -> dict[str, Any]:
    """pyone gives TEMPLATE as a dict: vectors are dicts (a list of them when repeated)."""
    if not isinstance(value, Mapping):
        return {}
    vectors = frozenset(str(k) for k, v in value.items() if isinstance(v, Mapping | list))
    topology = value.get("TOPOLOGY")
    pin = topology.get("PIN_POLICY") if isinstance(topology, Mapping) else None
    return {"template": _flat_dict(value), "template_vectors": vectors, "pin_policy": str(pin or "").strip()}


def _flat_dict(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if not isinstance(v, Mapping | list)}


# --------------------------------------------------------------------------------------------------------------
# Events: ZeroMQ frames from one_hm and hook `$TEMPLATE` arguments.

DEFAULT_MAX_EVENT_BYTES = 1 << 20  # a VM with a long history is ~10 KB; 1 MiB leaves room and bounds memory


class EventError(ValueError):
    """Input that is not a usable OpenNebula event. `reason` is a short label used as a metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ObjectKind(StrEnum):
    HOST = "HOST"
    VM = "VM"


@dataclass(frozen=True, slots=True)
class EventKey:
    kind: ObjectKind
    id: int
    state: str
    lcm_state: str | None


@dataclass(frozen=True, slots=True)
class HostEvent:
    host_id: int
    state: HostState
    host: HostView | None = None


@dataclass(frozen=True, slots=True)
class VmEvent:
    vm_id: int
    state: VmState
    lcm_state: LcmState
    vm: VmView | None = None


Event = HostEvent | VmEvent


def event_size_bytes(event: Event) -> int:
    """Rough Python memory a decoded event holds (its template dominates): what byte budgets of queues count."""
    if isinstance(event, HostEvent):
        if event.host is None:
            return 200
        return 600 + 40 * len(event.host.vm_ids) + _mapping_bytes(event.host.template)
    return 200 if event.vm is None else 800 + _mapping_bytes(event.vm.user_template)


def _mapping_bytes(values: Mapping[str, str]) -> int:
    return sum(150 + len(k) + len(v) for k, v in values.items())


def max_frame_bytes(max_event_bytes: int) -> int:
    """The largest ZeroMQ content frame an event of `max_event_bytes` can arrive in (base64 and some slack)."""
    return max_event_bytes * 4 // 3 + 16

_KEY_STATE_HOST = re.compile(rb"^EVENT STATE HOST/([A-Z_]+)//(\d{1,10}) ?$")
_KEY_HOST = re.compile(rb"^EVENT HOST (\d{1,10})/([A-Z_]+)/ ?$")
_KEY_STATE_VM = re.compile(rb"^EVENT STATE VM/([A-Z_]+)/([A-Z_]+)/(\d{1,10}) ?$")
_KEY_VM = re.compile(rb"^EVENT VM (\d{1,10})/([A-Z_]+)/([A-Z_]+) ?$")

# Prefixes a subscriber needs (REFERENCE §2: a byte-prefix match on frame 1). Host keys: every state change, since
# MONITORED cancels a pending incident. VM keys: UNKNOWN and the failure states only.
HOST_PREFIXES = (b"EVENT STATE HOST/",)
VM_PREFIXES = (b"EVENT STATE VM/ACTIVE/UNKNOWN/", b"EVENT STATE VM/POWEROFF/LCM_INIT/",
               *(f"EVENT STATE VM/ACTIVE/{s.name}/".encode() for s in sorted(FAILURE_LCM_STATES)))


def parse_key(key: bytes) -> EventKey:
    """Parse frame 1 in either of the two forms oned publishes for a state change."""
    if m := _KEY_STATE_HOST.match(key):
        return EventKey(ObjectKind.HOST, int(m[2]), m[1].decode(), None)
    if m := _KEY_HOST.match(key):
        return EventKey(ObjectKind.HOST, int(m[1]), m[2].decode(), None)
    if m := _KEY_STATE_VM.match(key):
        return EventKey(ObjectKind.VM, int(m[3]), m[1].decode(), m[2].decode())
    if m := _KEY_VM.match(key):
        return EventKey(ObjectKind.VM, int(m[1]), m[2].decode(), m[3].decode())
    raise EventError("bad_key", repr(key[:80]))


def safe_b64decode(data: bytes | str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> bytes:
    """Base64 with whitespace tolerated, size checked before decoding so a huge payload costs nothing."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    if len(raw) > max_frame_bytes(max_bytes):
        raise EventError("too_large", f"{len(raw)} bytes")
    try:
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EventError("bad_base64", str(exc)) from exc


# lxml >= 5 (REFERENCE §5: older lxml resolved external entities): entities are never resolved, nothing is fetched,
# no DTD is loaded, and libxml2's limits against huge trees and entity amplification stay on. A document that
# carries a DTD at all is refused: oned never sends one, so it can only be hostile.
# Parse cost and the size of what a document turns into are bounded too: the size cap alone lets 1 MiB hold ~90,000
# elements (each becoming Python objects in a view), so elements and attributes are bounded, and libxml2 refuses
# nesting deeper than 256 levels (huge_tree=False). A real event is far below the limits: a VM with a long history
# is a few hundred elements, a host with 2,000 VMs and 256 NUMA cores a few thousand, and oned's XML has no
# attributes. Fast path: a document starting with "<" (an ASCII-compatible encoding) has at most as many elements as
# "<" bytes and attributes as "=" bytes; only one over those counts is parsed with a pull parser that counts and
# stops at the first limit passed (10x slower per document, so not for every event).
MAX_XML_ELEMENTS = 20_000
MAX_XML_ATTRIBUTES = 256  # in the whole document
_FEED_BYTES = 64 * 1024  # the counting parse is fed in chunks and checked between them: a hostile document stops early
_PARSER_OPTIONS: dict[str, Any] = {"resolve_entities": False, "no_network": True, "load_dtd": False,
                                   "dtd_validation": False, "huge_tree": False, "remove_comments": True,
                                   "remove_pis": True}
_parsers = threading.local()  # lxml parsers must not be shared between threads


def _parser() -> Any:
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = etree.XMLParser(**_PARSER_OPTIONS)
    return parser


def _within_limits_for_sure(doc: bytes) -> bool:
    return (doc.lstrip()[:1] == b"<" and doc.count(b"<") <= MAX_XML_ELEMENTS
            and doc.count(b"=") <= MAX_XML_ATTRIBUTES)


def _counted_parse(doc: bytes) -> XmlElement:
    parser = etree.XMLPullParser(events=("start",), **_PARSER_OPTIONS)
    elements = attributes = 0
    for start in range(0, len(doc), _FEED_BYTES):
        parser.feed(doc[start:start + _FEED_BYTES])
        for _, elem in parser.read_events():
            elements += 1
            attributes += len(elem.attrib)
        if elements > MAX_XML_ELEMENTS:
            raise EventError("too_complex", f"more than {MAX_XML_ELEMENTS} elements")
        if attributes > MAX_XML_ATTRIBUTES:
            raise EventError("too_complex", f"more than {MAX_XML_ATTRIBUTES} attributes")
    return parser.close()


def safe_parse_xml(doc: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> XmlElement:
    """Parse untrusted XML: no DTDs, no entities; size, elements, attributes and depth bounded."""
    if len(doc) > max_bytes:
        raise EventError("too_large", f"{len(doc)} bytes")
    try:
        root = etree.fromstring(doc, _parser()) if _within_limits_for_sure(doc) else _counted_parse(doc)
    except etree.XMLSyntaxError as exc:
        # libxml2 stops entity bombs itself ("Maximum entity amplification factor exceeded"): count them as hostile.
        text = str(exc)
        reason = "hostile_xml" if "amplification" in text else "too_complex" if "depth" in text else "bad_xml"
        raise EventError(reason, text) from exc
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise EventError("hostile_xml", "document carries a DTD")
    return root


def decode_event(key: bytes, content: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event:
    """Decode one ZeroMQ message (key frame, base64 HOOK_MESSAGE frame) into an event."""
    parsed = parse_key(key)
    root = safe_parse_xml(safe_b64decode(content, max_bytes), max_bytes)
    if root.tag != "HOOK_MESSAGE" or root.findtext("HOOK_TYPE") != "STATE":
        raise EventError("not_state_message", root.tag)
    if root.findtext("HOOK_OBJECT") != parsed.kind.value:
        raise EventError("key_mismatch", "object")
    if _int(root.findtext("RESOURCE_ID")) != parsed.id:
        raise EventError("key_mismatch", "resource id")
    body = root.find(parsed.kind.value)
    return _event_from(parsed.kind, body, parsed.id, parsed.state, parsed.lcm_state)


def decode_template(template_b64: bytes | str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Event:
    """Decode a hook's `$TEMPLATE` argument: base64 of the bare HOST or VM element."""
    root = safe_parse_xml(safe_b64decode(template_b64, max_bytes), max_bytes)
    if root.tag not in ("HOST", "VM"):
        raise EventError("not_a_template", root.tag)
    kind = ObjectKind(root.tag)
    return _event_from(kind, root, _int(root.findtext("ID")), None, None)


def _event_from(kind: ObjectKind, body: XmlElement | None, rid: int, state: str | None,
                lcm: str | None) -> Event:
    if rid < 0:
        raise EventError("bad_message", "no resource id")
    if kind is ObjectKind.HOST:
        host = HostView.from_xml(body) if body is not None else None
        if host is not None and host.id != rid:
            raise EventError("key_mismatch", "embedded host id")
        hstate = _named(HostState, state) if state else (host.state if host else None)
        if hstate is None:
            raise EventError("bad_message", "host state")
        return HostEvent(rid, hstate, host)
    vm = VmView.from_xml(body) if body is not None else None
    if vm is not None and vm.id != rid:
        raise EventError("key_mismatch", "embedded vm id")
    vstate = _named(VmState, state) if state else (vm.state if vm else None)
    vlcm = _named(LcmState, lcm) if lcm else (vm.lcm_state if vm else None)
    if vstate is None or vlcm is None:
        raise EventError("bad_message", "vm state")
    return VmEvent(rid, vstate, vlcm, vm)


def _named(enum: Any, name: str) -> Any:
    try:
        return enum[name]
    except KeyError as exc:
        raise EventError("bad_state", name) from exc


# --------------------------------------------------------------------------------------------------------------
# The oned client: pyone, with a transport that really times out (REFERENCE §5) and keeps connections alive.


class ErrorKind(StrEnum):
    TRANSIENT = "transient"  # connection, timeout, INTERNAL, LOCKED: retry with backoff
    PERMANENT = "permanent"  # NO_EXISTS, AUTHENTICATION, AUTHORIZATION, bad parameter: do not retry
    WRONG_STATE = "wrong_state"  # ACTION: re-read the object and decide again
    UNKNOWN = "unknown"  # a mutating call got no readable answer: it may have been applied; re-read, never re-send


def classify_error(exc: BaseException, mutating: bool = False) -> ErrorKind:
    """What a failed call means. For a `mutating` call, any failure but a connection never made or oned's own
    error answer leaves its outcome UNKNOWN: the request may have reached oned, which may apply it (or already
    has). An HTTP error status counts as unknown too: a proxy in front of oned may have forwarded the call."""
    import pyone
    import requests

    if mutating and not isinstance(exc, pyone.OneException) and not never_sent(exc):
        return ErrorKind.UNKNOWN
    if isinstance(exc, pyone.OneActionException):
        return ErrorKind.WRONG_STATE
    permanent = (pyone.OneNoExistsException, pyone.OneAuthenticationException,
                 pyone.OneAuthorizationException, pyone.OneApiException)
    if isinstance(exc, permanent):
        return ErrorKind.PERMANENT
    # pyone raises a bare OneException for LOCKED, REPLICATION and ALLOCATE; the first two are passing.
    transient = (pyone.OneException, requests.RequestException, OSError, xmlrpc.client.ProtocolError,
                 xmlrpc.client.ResponseError, SyntaxError)
    if isinstance(exc, transient):
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def never_sent(exc: BaseException) -> bool:
    """The request cannot have reached oned: the connection was never made (refused, connect timeout, DNS)."""
    import requests
    import urllib3

    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)
    return False


def is_no_exists(exc: BaseException) -> bool:
    """oned answered NO_EXISTS (0x400): the object is gone."""
    import pyone

    return isinstance(exc, pyone.OneNoExistsException)


def make_server(endpoint: str, session: str, connect_timeout_s: float = 3.0, read_timeout_s: float = 15.0,
                https_verify: bool | str = True) -> Any:
    """A pyone OneServer whose calls are bounded by connect and read timeouts."""
    if not endpoint.startswith(("http://", "https://")):
        # pyone would silently take its broken gRPC path (REFERENCE §5).
        raise ValueError(f"oned endpoint must start with http:// or https://, got {endpoint!r}")
    from pyone.server_xrpc import OneServerXRPC

    server = OneServerXRPC(endpoint, session=session, https_verify=https_verify)
    transport = _timeout_transport(connect_timeout_s, read_timeout_s, endpoint.startswith("https"),
                                   https_verify)
    server._ServerProxy__transport = transport  # the only hook pyone offers for its transport
    return server


def _timeout_transport(connect_s: float, read_s: float, https: bool, verify: bool | str) -> Any:
    import requests
    from pyone.server_xrpc import RequestsTransport

    class TimeoutTransport(RequestsTransport):
        """pyone's transport, but with timeouts and one keep-alive requests.Session per thread."""

        _local = threading.local()

        def request(self, host: str, handler: str, request_body: bytes, verbose: bool = False) -> Any:
            session = getattr(self._local, "session", None)
            if session is None:
                session = self._local.session = requests.Session()
            url = self._build_url(host, handler)
            resp = session.post(url, data=request_body, headers=self.headers, verify=self.https_verify,
                                timeout=(connect_s, read_s))
            if resp.status_code != 200:
                raise xmlrpc.client.ProtocolError(url, resp.status_code, resp.reason, dict(resp.headers))
            return self.parse_response(resp)

    transport = TimeoutTransport()
    transport.set_https(https)
    transport.set_https_verify(verify)
    return transport


class OnedClient:
    """The calls oneha makes, returning views. Errors are pyone's; `classify_error` says what they mean."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def host_info(self, host_id: int) -> HostView:
        return HostView.from_pyone(self.server.host.info(host_id))

    def host_pool(self) -> list[HostView]:
        pool = self.server.hostpool.info()
        return [HostView.from_pyone(h) for h in (pool.HOST or [])]

    def vm_info(self, vm_id: int) -> VmView:
        return VmView.from_pyone(self.server.vm.info(vm_id))

    def vm_pool_set(self, vm_ids: Iterable[int], extended: bool = False) -> list[VmView]:
        """`extended`: whole bodies. The short ones (oned's `to_xml_short`) carry no HA / HA_PRIORITY: any read
        that decides *whether or in what order* to recover must ask for the extended body."""
        ids = ",".join(str(i) for i in vm_ids)
        if not ids:
            return []
        pool = self.server.vmpool.infoset(ids, extended)
        return [VmView.from_pyone(v) for v in (pool.VM or [])]

    def vm_pool_by_state(self, state: int = -1) -> list[VmView]:
        pool = self.server.vmpool.info(-2, -1, -1, state)
        return [VmView.from_pyone(v) for v in (pool.VM or [])]

    def vm_action(self, action: str, vm_id: int) -> None:
        self.server.vm.action(action, vm_id)

    def vm_recover(self, vm_id: int, op: RecoverOp) -> None:
        self.server.vm.recover(vm_id, int(op))

    def host_status(self, host_id: int, status: HostStatus) -> None:
        self.server.host.status(host_id, int(status))

    def vm_deploy(self, vm_id: int, host_id: int, enforce: bool, ds_id: int) -> None:
        """`one.vm.deploy(id, host, enforce, ds)`: ds -1 = the cluster's default system datastore."""
        self.server.vm.deploy(vm_id, host_id, enforce, ds_id)

    def shared_system_datastores(self) -> frozenset[int]:
        pool = self.server.datastorepool.info()
        shared = set()
        for ds in pool.DATASTORE or []:
            tmpl = _flat_dict(getattr(ds, "TEMPLATE", None))
            if int(ds.TYPE) == 1 and tmpl.get("SHARED", "").upper() == "YES":
                shared.add(int(ds.ID))
        return frozenset(shared)
