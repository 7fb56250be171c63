"""The lab cloud as one object: model + XML-RPC server + event publisher + the clock thread.

    with LabCloud(hosts=4, vms=10, monitoring_interval_s=0.5, step_delay_s=0.05) as lab:
        one = pyone.OneServer(lab.rpc_url, session=lab.session)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from oneha.lab.cloud import Cloud
from oneha.lab.events import EventPublisher
from oneha.lab.rpc import Faults, LabRpc, RpcServer, Stats

DEFAULT_SESSION = "oneadmin:opennebula"


class LabCloud:
    """A simulated OpenNebula front-end.

    Hosts are spread round-robin over `clusters`; `shared[c]` says whether cluster c's system datastore is shared
    (default: even clusters shared, odd local, i.e. cluster 0 shared and cluster 1 local). `vms` VMs are created
    RUNNING, spread over the hosts, with HA_PRIORITY cycling 0..3 so priority ordering can be tested.
    """

    def __init__(self, hosts: int = 4, vms: int = 0, clusters: int = 1, shared: Sequence[bool] | None = None,
                 monitoring_interval_s: float = 2.0, step_delay_s: float = 0.2, seed: int = 0,
                 capacity: int | None = None, session: str = DEFAULT_SESSION, tick_s: float = 0.02) -> None:
        self.cloud = Cloud(monitoring_interval_s=monitoring_interval_s, step_delay_s=step_delay_s, seed=seed)
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
        self._clock = threading.Thread(target=self._run_clock, name="lab-clock", daemon=True)

    def start(self, port: int = 0, events_port: int = 0, bind: str = "127.0.0.1") -> LabCloud:
        self.events = EventPublisher(bind, events_port, seed=self.seed)
        self.cloud.sink = self.events.publish
        api = LabRpc(self.cloud, self.session, self.faults, self.stats, self.events)
        self.rpc = RpcServer(api, bind, port)
        self.rpc.start()
        self._clock.start()
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
            self.cloud.tick()

    def stop(self) -> None:
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
