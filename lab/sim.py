"""The lab cloud as one object: model + XML-RPC server + event publisher + the clock thread.

    with LabCloud(hosts=4, vms=10, monitoring_interval_s=0.5, step_delay_s=0.05) as lab:
        one = pyone.OneServer(lab.rpc_url, session=lab.session)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from oneha.lab.cloud import Cloud
from oneha.lab.events import EventPublisher
from oneha.lab.rpc import Faults, LabRpc, RpcServer, Stats
from oneha.lab.timeline import FAST, Profile, Timelines

if TYPE_CHECKING:
    from oneha.lab.hostside import HostSide, HostSideOptions

DEFAULT_SESSION = "oneadmin:opennebula"
log = logging.getLogger("oneha.lab")


class LabCloud:
    """A simulated OpenNebula front-end.

    Hosts are spread round-robin over `clusters`; `shared[c]` says whether cluster c's system datastore is shared
    (default: even clusters shared, odd local, i.e. cluster 0 shared and cluster 1 local). `vms` VMs are created
    RUNNING, spread over the hosts, with HA_PRIORITY cycling 0..3 so priority ordering can be tested.
    `profile` (lab.timeline): FAST (default) is the immediate model driven by `monitoring_interval_s` and
    `step_delay_s`; a timed profile (PRODUCTION, or PRODUCTION.scaled(f)) plays oned's own timelines instead.
    `host_side` (lab.hostside.HostSideOptions): give every host its loopback address with sshd/libvirtd listeners, a
    Redfish BMC and a heartbeat file (`self.host_side`; one per process).
    """

    def __init__(self, hosts: int = 4, vms: int = 0, clusters: int = 1, shared: Sequence[bool] | None = None,
                 monitoring_interval_s: float = 2.0, step_delay_s: float = 0.2, seed: int = 0,
                 capacity: int | None = None, session: str = DEFAULT_SESSION, tick_s: float = 0.02,
                 missing_state: str = "POWEROFF", state_guard_s: float | None = None,
                 profile: Profile = FAST, host_side: HostSideOptions | None = None) -> None:
        self.cloud = Cloud(monitoring_interval_s=monitoring_interval_s, step_delay_s=step_delay_s, seed=seed,
                           missing_state=missing_state, state_guard_s=state_guard_s)
        self.profile = profile
        self.host_side_options = host_side
        self.host_side: HostSide | None = None  # lab.hostside: per-host addresses, listeners, BMCs, heartbeats
        self.session = session
        self.seed = seed
        self.tick_s = tick_s
        per_host = -(-vms // hosts) if hosts else 0
        capacity = capacity if capacity is not None else max(32, 2 * per_host)
        for c in range(clusters):
            self.cloud.add_cluster(c, shared[c] if shared is not None and c < len(shared) else c % 2 == 0)
        for h in range(hosts):
            self.cloud.add_host(h % clusters, capacity=capacity)
        for v in range(vms):
            self.cloud.create_vm({"HOST": v % hosts, "STATE": "RUNNING", "HA_PRIORITY": v % 4}, emit=False)
        self.faults = Faults(seed)
        self.stats = Stats()
        self.events: EventPublisher | None = None
        self.rpc: RpcServer | None = None
        self._stop = threading.Event()
        self.tick_errors = 0  # ticks that raised: logged and counted (lab.stats), the clock keeps going
        self._clock = threading.Thread(target=self._run_clock, name="lab-clock", daemon=True)

    def start(self, port: int = 0, events_port: int = 0, bind: str = "127.0.0.1") -> LabCloud:
        self.events = EventPublisher(bind, events_port, seed=self.seed)
        self.cloud.sink = self.events.publish
        api = self.api = LabRpc(self.cloud, self.session, self.faults, self.stats, self.events,
                                lambda: self.tick_errors)
        self.rpc = RpcServer(api, bind, port)
        self.rpc.start()
        if self.profile.timed:  # issue 12: oned's timelines start with the clock
            with self.cloud.lock:
                self.cloud.timing = Timelines(self.cloud, self.profile)
        self._clock.start()
        if self.host_side_options is not None:
            from oneha.lab.hostside import HostSide  # sushy-tools is a lab extra: imported only when asked for

            self.host_side = api.host_side = HostSide(self.cloud, self.host_side_options).start()
        return self

    @property
    def rpc_url(self) -> str:
        assert self.rpc is not None, "start() first"
        return self.rpc.url

    @property
    def events_url(self) -> str:
        assert self.events is not None, "start() first"
        return self.events.url

    def _run_clock(self) -> None:
        # One thread moves time; ~20 ms ticks keep step delays of 50 ms accurate enough for tests.
        while not self._stop.wait(self.tick_s):
            try:
                self.cloud.tick()
            except Exception:  # one bad tick must not freeze the lab's time without a sign
                self.tick_errors += 1
                log.exception("lab clock: tick failed (%d so far); ticking on", self.tick_errors)

    def stop(self) -> None:
        if self.host_side is not None:
            self.host_side.stop()
            self.host_side = None
        self._stop.set()
        if self._clock.is_alive():
            self._clock.join(timeout=5)
        if self.rpc is not None:
            self.rpc.stop()
        self.cloud.sink = None
        if self.events is not None:
            self.events.close()

    def __enter__(self) -> LabCloud:
        if self.rpc is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
