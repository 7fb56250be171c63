"""The host side of the lab: what each hypervisor shows its management network, on its own loopback address (issue 12).

Per lab host h, at `address(h)` = 127.50.{h // 250}.{h % 250 + 1} (all of 127.0.0.0/8 is local, so a probe of one
host never touches another):
- TCP listeners where sshd (22) and libvirtd (16509) would be: sshd sends its version banner, libvirtd accepts.
- a Redfish BMC on 443 (HTTPS, HTTP basic auth from an htpasswd file with bcrypt hashes, as sushy-tools supports):
  OpenStack's sushy-tools emulator app with its fake systems driver, one system per host. `LabSystems` subclasses
  that driver so that the power state is the lab's: a reset is applied after a delay drawn from `bmc_delay_s`
  (sushy-tools' own fake driver draws 1-11 s), and powering off fences the lab host (its domains stop).
  Each BMC address serves only its own system. The host template gets FENCE_IP and FENCE_REDFISH_SYSTEM, and
  `cred_dir/default.cred` holds what `deploy/fence/fence_redfish.sh` needs (user, password, cacert).
- the host-side agent (issue 13): every host runs `oneha.agent.core.AgentCore`, the agent's own decisions, ticked by
  the hostside thread on the lab's clock (no thread per host). Each beat (`heartbeat_s`) it writes the real heartbeat
  format (oneha/timing_rule.py) to `heartbeat_dir/<host NAME>` while it sees its storage (the directory plays the
  shared system datastore; the storage is seen unless the host is off or in storage_partition), and it sees a
  detector when its management net is up and a real TCP connection from the host's address to one of
  `options.detectors` (the detectors' beacon endpoints) succeeds. With no detectors, an agent in isolation "fence"
  never arms (its heartbeats say "unarmed"), so no watchdog is modelled. Armed, its watchdog is modelled: not
  petted for `watchdog_timeout_s`, the host resets (`cloud.host_fence`: its domains stop), is down for `reboot_s`
  (sshd, libvirtd and agent silent, BMC On), and comes back with no domains and a new boot; a partition it was in
  outlasts the reboot (the fresh agent then never arms: no reboot loop). kernel_hang is a hang the modelled watchdog
  does not catch (softdog on a hard-locked kernel): only the BMC fences it.
- `block_source(addr)`: sshd and libvirtd reset connections from one source address (a detector cut off from every
  host by its own network).

Failure modes, each consistent on every signal (`fail(h, mode)`; `restore(h)` undoes it):

| mode              | oned / truth                 | sshd, libvirtd       | BMC                    | heartbeat |
|-------------------|------------------------------|----------------------|------------------------|-----------|
| psu               | dead (VMs gone)              | refused              | answers, Off           | stops     |
| power_loss        | dead (VMs gone)              | refused              | does not answer        | stops     |
| kernel_hang       | dead (VMs gone)              | connect, then silent | answers, On            | stops     |
| mgmt_partition    | unreachable, VMs keep running| refused              | answers On, or not     | beats     |
| storage_partition | fine                         | answer               | answers, On            | stops     |
| flapping          | unreachable / back, in turns | refused / answer     | answers, On            | beats     |

With an armed agent, mgmt_partition (isolation "fence") and storage_partition end in a watchdog reset after the
self-fence deadline; flapping shorter than loss_timeout_s never does.

One thread serves every listener and BMC (a selector) and keeps every due time (heartbeats, flapping, BMC power
changes) on the lab's clock. Only one HostSide per process: the sushy-tools app is a module-level singleton.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import random
import secrets
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from sushy_tools import error as sushy_error
from sushy_tools.emulator import main as sushy_main
from sushy_tools.emulator.resources.systems.fakedriver import FakeDriver
from werkzeug.serving import BaseWSGIServer, make_server

from oneha.agent.core import AgentCore
from oneha.agent.heartbeat import atomic_write
from oneha.agent.visibility import any_accepts
from oneha.lab.cloud import Cloud
from oneha.timing_rule import AgentTiming, Isolation

MODES = ("psu", "power_loss", "kernel_hang", "mgmt_partition", "storage_partition", "flapping")
DEAD = ("psu", "power_loss", "kernel_hang", "off")  # no agent runs
SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 oneha-lab\r\n"
_ACTIVE = threading.Lock()  # one HostSide per process


def address(hid: int) -> str:
    return f"127.50.{hid // 250}.{hid % 250 + 1}"


@dataclass
class HostSideOptions:
    ssh_port: int = 22
    libvirt_port: int = 16509
    bmc_port: int = 443
    bmc_delay_s: tuple[float, float] = (1.0, 11.0)  # sushy-tools' fake driver: 1-11 s
    heartbeat_s: float = 1.0  # the agent's beat_interval_s
    flap_period_s: float = 2.0
    loss_timeout_s: float = 10.0  # the agent's timing (oneha/timing_rule.py); checked at start
    watchdog_timeout_s: float = 10.0
    reboot_s: float = 60.0  # a host reset by its watchdog is down this long
    isolation: Isolation = "fence"
    isolation_by_host: dict[int, Isolation] = field(default_factory=dict)
    detectors: list[tuple[str, int]] = field(default_factory=list)  # beacon endpoints (addr, port); empty: none
    probe_timeout_s: float = 0.05  # of one beat's detector probe (loopback)
    bmc_user: str = "admin"
    workdir: Path | None = None  # heartbeat/, cred/, bmc/ (a temporary directory if None)
    seed: int = 0


@dataclass
class Signals:
    """What one host shows. net: up | down | hung (sshd and libvirtd)."""

    address: str
    uuid: str
    mode: str = "ok"
    net: str = "up"
    bmc: bool = True
    bmc_power: str = "On"
    beating: bool = True
    pending_power: tuple[float, str] | None = None
    next_beat: float = 0.0
    agent: AgentCore | None = None  # None: not running (host down), or started at the next beat
    boot: int = 0
    last_pet: float | None = None  # the watchdog model: armed once set
    up_at: float | None = None  # reset by the watchdog: back up at this time
    resets: int = 0
    next_flap: float | None = None
    blocked: set[str] = field(default_factory=set)  # source addresses whose connections are reset (block_source)
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    bmc_server: BaseWSGIServer | None = None


class LabSystems(FakeDriver):
    """sushy-tools' fake systems driver with the lab's power model behind it."""

    side: HostSide

    def get_power_state(self, identity: str) -> str:
        return self.side.bmc_power(self.uuid(identity))

    def set_power_state(self, identity: str, state: str) -> None:
        if "On" in state:
            target = "On"
        elif state in ("ForceOff", "GracefulShutdown"):
            target = "Off"
        elif "Restart" in state:
            target = "Restart"
        else:
            raise sushy_error.NotSupportedError(f"Power state {state} is not supported")
        self.side.request_power(self.uuid(identity), target)


class _OwnSystemOnly:
    """WSGI wrapper: a host's BMC shows only that host's system."""

    def __init__(self, app: Callable[..., Any], uuid: str) -> None:
        self.app, self.uuid = app, uuid

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        parts = environ.get("PATH_INFO", "").strip("/").split("/")
        if len(parts) >= 4 and parts[:3] == ["redfish", "v1", "Systems"] and parts[3] != self.uuid:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error": {"message": "not this BMC\'s system"}}']
        return self.app(environ, start_response)


class HostSide:
    """The management-network side of every host of a lab cloud."""

    def __init__(self, cloud: Cloud, options: HostSideOptions | None = None) -> None:
        self.cloud = cloud
        self.o = options or HostSideOptions()
        self._tmp = tempfile.TemporaryDirectory(prefix="oneha-hostside-") if self.o.workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp is not None else Path(self.o.workdir)  # type: ignore[arg-type]
        self.heartbeat_dir = self.workdir / "heartbeat"
        self.cred_dir = self.workdir / "cred"
        self.rng = random.Random(self.o.seed)  # noqa: S311 - simulated BMC delays
        self.timing = AgentTiming(self.o.heartbeat_s, self.o.loss_timeout_s, self.o.watchdog_timeout_s)
        self.timing.check()
        self.names: dict[int, str] = {}
        self.lock = threading.Lock()
        self.hosts: dict[int, Signals] = {}
        self.by_uuid: dict[str, int] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-hostside", daemon=True)
        self._ssl: ssl.SSLContext | None = None
        self.password = secrets.token_urlsafe(16)
        self.cacert = self.workdir / "bmc" / "cert.pem"

    # Start / stop ----------------------------------------------------------------------------------------------
    def start(self) -> HostSide:
        if not _ACTIVE.acquire(blocking=False):
            raise RuntimeError("one HostSide per process (the sushy-tools app is a singleton)")
        # werkzeug logs every BMC request at INFO to stderr: the lab's live view and the bench tables are not for it
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        try:
            with self.cloud.lock:
                hids = sorted(self.cloud.hosts)
            for d in (self.heartbeat_dir, self.cred_dir, self.cacert.parent):
                d.mkdir(parents=True, exist_ok=True)
            self._make_tls([address(h) for h in hids])
            self._configure_bmc(hids)
            now = self.cloud.clock()
            with self.lock:
                for h in hids:
                    sig = self.hosts[h]
                    sig.next_beat = now
                    self._due(h, sig, now)  # the first heartbeats are on the storage before start() returns
                    self._sync(h, sig)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sig in self.hosts.values():
            self._close_net(sig)
            self._close_bmc(sig)
        with contextlib.suppress(RuntimeError):
            _ACTIVE.release()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HostSide:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_tls(self, addresses: Iterable[str]) -> None:
        key = self.cacert.parent / "key.pem"
        san = ",".join(f"IP:{a}" for a in addresses)
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("the lab's BMCs need the openssl command for their TLS certificate")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(self.cacert), "-days", "2", "-subj", "/CN=oneha-lab-bmc",
                        "-addext", f"subjectAltName={san}"], check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cacert), str(key))
        self._ssl = ctx

    def _configure_bmc(self, hids: list[int]) -> None:
        htpasswd = self.cacert.parent / "htpasswd"
        digest = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text(f"{self.o.bmc_user}:{digest}\n")
        htpasswd.chmod(0o600)
        cred = self.cred_dir / "default.cred"
        cred.write_text(f"user={self.o.bmc_user}\npassword={self.password}\ncacert={self.cacert}\n")
        cred.chmod(0o600)
        systems = []
        with self.cloud.lock:
            for h in hids:
                host = self.cloud.hosts[h]
                uuid = f"0e7a0000-0000-4000-8000-{h:012d}"
                systems.append({"uuid": uuid, "name": host.name, "power_state": "On", "nics": []})
                self.hosts[h] = Signals(address(h), uuid)
                self.names[h] = host.name
                self.by_uuid[uuid] = h
                host.template["FENCE_IP"] = address(h)
                host.template["ONEHA_MGMT_ADDRESS"] = address(h)  # what detectors probe (contract point 1)
                host.template["FENCE_REDFISH_SYSTEM"] = f"/redfish/v1/Systems/{uuid}"
                self.cloud._touch_host(host)
        app = sushy_main.app
        if isinstance(app.wsgi_app, sushy_main.RedfishAuthMiddleware):
            # configure() wraps the app in its auth middleware only once, with the first auth file: a later host
            # side in the same process (another test module) would check passwords against a deleted file.
            app.wsgi_app = app.wsgi_app.app
        app.configure(extra_config={"SUSHY_EMULATOR_FAKE_DRIVER": True, "SUSHY_EMULATOR_FAKE_SYSTEMS": systems,
                                    "SUSHY_EMULATOR_STATE_DIR": str(self.cacert.parent / "state"),
                                    "SUSHY_EMULATOR_AUTH_FILE": str(htpasswd)})
        # configure() wraps the app in its auth middleware only once per process, with the first auth file: a later
        # HostSide (one at a time, as several test modules start them) points it at its own.
        if isinstance(app.wsgi_app, sushy_main.RedfishAuthMiddleware):
            app.wsgi_app.auth_file = str(htpasswd)
        driver = LabSystems.initialize(app.config, app.logger)()
        driver.side = self
        # Application.systems is memoized (sushy_tools.emulator.memoize): seed its cache with the lab's driver.
        app._cache = {sushy_main.Application.systems.fget.__wrapped__: {(frozenset(), frozenset()): driver}}

    # Failure modes ---------------------------------------------------------------------------------------------
    def fail(self, hid: int, mode: str, bmc_reachable: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown failure mode {mode!r}: one of {MODES}")
        cloud = self.cloud
        with self.lock:
            sig = self.hosts[hid]
            sig.mode = mode
            if mode in ("psu", "power_loss", "kernel_hang"):
                cloud.host_kill(hid)
                sig.net = "hung" if mode == "kernel_hang" else "down"
                sig.bmc = mode != "power_loss"
                sig.bmc_power = "On" if mode == "kernel_hang" else "Off"
                sig.beating = False
                self._agent_stops(sig)
            elif mode == "mgmt_partition":
                cloud.host_partition(hid)
                sig.net, sig.bmc, sig.beating = "down", bmc_reachable, True
            elif mode == "storage_partition":
                sig.beating = False
            else:  # flapping: the management link goes down now and comes back every flap_period_s
                cloud.host_partition(hid)
                sig.net = "down"
                sig.next_flap = cloud.clock() + self.o.flap_period_s

    def restore(self, hid: int) -> None:
        with self.lock:
            sig = self.hosts[hid]
            if sig.mode in DEAD or sig.up_at is not None:
                self._agent_stops(sig)  # powered on (or done rebooting) now: a new boot, a new agent
                sig.boot += 1
            sig.up_at = None
            self.cloud.host_revive(hid)
            sig.mode, sig.net, sig.bmc, sig.bmc_power, sig.beating = "ok", "up", True, "On", True
            sig.next_flap = sig.pending_power = None

    def block_source(self, addr: str, blocked: bool = True, hids: Iterable[int] | None = None) -> None:
        """Cut one prober off every host (or `hids`): sshd and libvirtd reset connections from `addr` (a detector
        instance whose own network failed) while every other source still gets answers."""
        with self.lock:
            for hid in self.hosts if hids is None else hids:
                (self.hosts[hid].blocked.add if blocked else self.hosts[hid].blocked.discard)(addr)

    # BMC power (called by LabSystems from the BMC request, in the hostside thread) ------------------------------
    def bmc_power(self, uuid: str) -> str:
        with self.lock:
            self._apply_power(self.by_uuid[uuid], self.cloud.clock())
            return self.hosts[self.by_uuid[uuid]].bmc_power

    def request_power(self, uuid: str, target: str) -> None:
        with self.lock:
            sig = self.hosts[self.by_uuid[uuid]]
            if target != "Restart" and sig.bmc_power == target:
                return
            if target == "Restart":
                self._power_off(self.by_uuid[uuid])
                target = "On"
            sig.pending_power = (self.cloud.clock() + self.rng.uniform(*self.o.bmc_delay_s), target)

    def _apply_power(self, hid: int, now: float) -> None:
        sig = self.hosts[hid]
        if sig.pending_power is None or now < sig.pending_power[0]:
            return
        target = sig.pending_power[1]
        sig.pending_power = None
        if target == "Off":
            self._power_off(hid)
        else:
            self.cloud.host_revive(hid)
            sig.mode, sig.net, sig.bmc_power, sig.beating, sig.next_flap = "ok", "up", "On", True, None
            sig.boot += 1

    def _power_off(self, hid: int) -> None:
        sig = self.hosts[hid]
        self.cloud.host_fence(hid)  # the domains stop, whatever the front-end can see
        sig.mode, sig.net, sig.bmc_power, sig.beating, sig.next_flap = "off", "down", "Off", False, None
        sig.up_at = None
        self._agent_stops(sig)

    # The agent (oneha.agent.core) and its watchdog -------------------------------------------------------------
    def heartbeat_path(self, hid: int) -> Path:
        return self.heartbeat_dir / self.names[hid]

    @staticmethod
    def _agent_stops(sig: Signals) -> None:
        sig.agent, sig.last_pet = None, None

    def _agent_beat(self, hid: int, sig: Signals, now: float) -> None:
        """One beat of the host's agent: the real core, with the lab's storage and network as its world."""
        if sig.agent is None:
            sig.agent = AgentCore(self.names[hid], f"lab-{sig.uuid}-boot{sig.boot}", self.timing,
                                  self.o.isolation_by_host.get(hid, self.o.isolation))
        agent = sig.agent
        heartbeat = agent.next_heartbeat()
        if sig.beating:  # sees its storage
            atomic_write(self.heartbeat_path(hid), heartbeat.encode(), sync=False)  # a local directory: no fsync
            agent.wrote(now)
        if sig.net == "up" and self.o.detectors and any_accepts(self.o.detectors, self.o.probe_timeout_s,
                                                                 source=sig.address):
            agent.saw_detector(now)
        decision = agent.beat(now)
        if decision.arm:
            agent.armed_now()
        if decision.pet and agent.armed:
            sig.last_pet = now

    def _watchdog(self, hid: int, sig: Signals, now: float) -> None:
        """Not petted for watchdog_timeout_s: the host resets; back up reboot_s later, with no domains."""
        if sig.last_pet is not None and now - sig.last_pet >= self.o.watchdog_timeout_s:
            self.cloud.host_fence(hid)  # the reset: every domain stops
            self._agent_stops(sig)
            sig.up_at, sig.resets = now + self.o.reboot_s, sig.resets + 1
        elif sig.up_at is not None and now >= sig.up_at:
            sig.up_at, sig.boot = None, sig.boot + 1
            if sig.net == "up":
                self.cloud.host_revive(hid)  # monitoring hears from it again; its domains are gone
            else:
                self.cloud.host_partition(hid)  # still cut off from the front-end, powered, nothing running

    # The one thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                key.data()
            now = self.cloud.clock()
            with self.lock:
                for hid, sig in self.hosts.items():
                    self._due(hid, sig, now)
                    self._sync(hid, sig)

    def _due(self, hid: int, sig: Signals, now: float) -> None:
        self._apply_power(hid, now)
        if sig.next_flap is not None and now >= sig.next_flap:
            sig.next_flap = now + self.o.flap_period_s
            sig.net = "down" if sig.net == "up" else "up"
            if sig.up_at is None:  # a rebooting host stays silent whatever its link does
                (self.cloud.host_partition if sig.net == "down" else self.cloud.host_revive)(hid)
        self._watchdog(hid, sig, now)
        if sig.mode not in DEAD and sig.up_at is None and now >= sig.next_beat:
            sig.next_beat = now + self.o.heartbeat_s
            self._agent_beat(hid, sig, now)

    def _sync(self, hid: int, sig: Signals) -> None:
        """Open, close or mute the host's sockets to match its signals."""
        if sig.net == "down" or sig.up_at is not None:
            self._close_net(sig)
        else:
            for kind, port in (("ssh", self.o.ssh_port), ("libvirt", self.o.libvirt_port)):
                if kind not in sig.sockets:
                    sig.sockets[kind] = self._listen(sig.address, port)
                self._watch(sig.sockets[kind], sig.net == "up",
                            functools.partial(_answer, sig.sockets[kind], kind, sig.blocked))
        if sig.bmc and sig.bmc_server is None:
            server = make_server(sig.address, self.o.bmc_port, _OwnSystemOnly(sushy_main.app, sig.uuid),
                                 ssl_context=self._ssl)
            server.timeout = 0  # handle_request() only when the selector saw a connection: never waits
            sig.bmc_server = server
            self._watch(server.socket, True, server.handle_request)
        elif not sig.bmc:
            self._close_bmc(sig)

    def _listen(self, addr: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _watch(self, sock: socket.socket, on: bool, handler: Callable[[], None]) -> None:
        registered = sock in self._selector.get_map() if sock.fileno() >= 0 else False
        if on and not registered:
            self._selector.register(sock, selectors.EVENT_READ, handler)
        elif not on and registered:
            self._selector.unregister(sock)  # muted: connections wait in the backlog, nothing answers

    def _close_net(self, sig: Signals) -> None:
        for sock in sig.sockets.values():
            self._forget(sock)
        sig.sockets.clear()

    def _close_bmc(self, sig: Signals) -> None:
        if sig.bmc_server is not None:
            self._forget(sig.bmc_server.socket)
            sig.bmc_server = None

    def _forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()


def _answer(listener: socket.socket, kind: str, blocked: set[str]) -> None:
    try:
        conn, peer = listener.accept()
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return
        raise
    with conn:
        if peer[0] in blocked:  # reset, not an orderly close: a blocked prober must see no answer at all
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if kind == "ssh":
            with contextlib.suppress(OSError):
                conn.sendall(SSH_BANNER)
