"""The scripted scenario of `oneha lab`: five failures, each injected into the lab cloud and watched until oneha
has dealt with it, then a summary measured from the incidents and the lab's truth oracle (not from logs)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from oneha.incidents import Incident, IncidentStore, Kind, Status
from oneha.lab.client import lab_call
from oneha.lab.stack import Stack
from oneha.opennebula import HostState, VmState
from oneha.waiting import WaitTimeout, wait_until


@dataclass
class Outcome:
    name: str
    what: str
    expected: Status
    injected_at: float
    incident: Incident | None = None
    actions: Counter[str] = field(default_factory=Counter)
    error: str = ""

    @property
    def detected_s(self) -> float | None:
        return self.incident.opened_at - self.injected_at if self.incident else None

    @property
    def settled_s(self) -> float | None:
        closed = self.incident.closed_at if self.incident else None
        return closed - self.injected_at if closed else None

    @property
    def ok(self) -> bool:
        return not self.error and self.incident is not None and self.incident.status is self.expected


@dataclass
class Summary:
    outcomes: list[Outcome]
    duplicates: list[int]
    lost: list[int]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes) and not self.duplicates and not self.lost


Progress = Callable[[str], None]


class Scenario:
    """Plays the failures one after the other (so that the storm guard sees ordinary single failures)."""

    def __init__(self, stack: Stack, progress: Progress = print, step_timeout_s: float = 90.0) -> None:
        assert stack.lab is not None
        self.stack = stack
        self.lab = stack.lab
        self.url = stack.lab.rpc_url
        self.say = progress
        self.timeout_s = step_timeout_s
        self.store = IncidentStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
        self.outcomes: list[Outcome] = []

    def play(self) -> Summary:
        hosts = self._hosts_by_cluster()
        steps: list[tuple[str, Callable[[], Outcome]]] = [
            ("host dies", lambda: self.host_dies(hosts[0][0])),
            ("host flaps", lambda: self.host_flaps(hosts[0][1])),
            ("VM crashes", lambda: self.vm_crashes(hosts[1][0])),
            ("VM fails to boot", lambda: self.vm_fails_to_boot(hosts[1][1])),
            ("host partitioned", lambda: self.host_partitioned(hosts[1][2])),
        ]
        if self.stack.detection:  # issue 13: the detectors prove host failures long before oned sees them
            steps = [
                ("power supply fails", lambda: self.detected("power supply fails", hosts[0][0], "psu",
                                                             "its BMC answers Off")),
                ("power lost, BMC dead", lambda: self.detected("power lost, BMC dead", hosts[0][1], "power_loss",
                                                               "its storage heartbeat, stale past its agent's "
                                                               "self-fence deadline, proves it")),
                ("VM crashes", lambda: self.vm_crashes(hosts[1][0])),
                ("VM fails to boot", lambda: self.vm_fails_to_boot(hosts[1][1])),
                ("management network cut", lambda: self.detected("management network cut", hosts[1][2],
                                                                 "mgmt_partition", "isolated while its heartbeat "
                                                                 "beats (never fenced), until its agent's watchdog "
                                                                 "resets it")),
            ]
        for name, step in steps:
            self.say(f"▶ {name}")
            outcome = step()
            self.outcomes.append(outcome)
            self.say(f"  {'✔' if outcome.ok else '✘'} {name}: {describe(outcome)}")
            # An incident closes once its VMs have *left* the failed host; let them land before the next failure,
            # or the next one could hit a host they are still booting on (a real cloud does that too).
            self._settled()
        return self._summary()

    # The five failures -------------------------------------------------------------------------------------
    def host_dies(self, hid: int) -> Outcome:
        out = self._inject("host dies", f"host {hid} loses power with its VMs", Status.RECOVERED,
                           "lab.host.kill", hid)
        return self._follow(out, Kind.HOST, hid)

    def host_flaps(self, hid: int) -> Outcome:
        # A power blip: back within the grace period, so the host incident is cancelled, but its domains are gone and
        # oned sets its VMs POWEROFF (history ACTION = MONITOR); oneha resumes them as VM crashes (issue 11 #5).
        out = self._inject("host flaps", f"host {hid} loses power, back within its grace period: its VMs, left "
                           "POWEROFF by oned, are resumed", Status.CANCELLED, "lab.host.kill", hid)
        try:
            found = wait_until(lambda: self._incident(Kind.HOST, hid, out.injected_at), self.timeout_s,
                               what=f"an incident for host {hid}")
            self.say(f"  host {hid} in ERROR, incident {found.id} waits out its grace: reviving the host")
        except WaitTimeout as exc:
            out.error = str(exc)
        lab_call(self.url, "lab.host.revive", hid)
        return self._follow(out, Kind.HOST, hid)

    def vm_crashes(self, hid: int) -> Outcome:
        vid = self._running_vm_on(hid)
        out = self._inject("VM crashes", f"VM {vid} crashes on healthy host {hid}", Status.RECOVERED,
                           "lab.vm.crash", vid)
        return self._follow(out, Kind.VM_CRASH, vid)

    def vm_fails_to_boot(self, hid: int) -> Outcome:
        vid = self._running_vm_on(hid)
        out = self._inject("VM fails to boot", f"VM {vid} lands in BOOT_FAILURE", Status.RECOVERED,
                           "lab.vm.fail", vid, "BOOT_FAILURE", False)
        return self._follow(out, Kind.VM_FAILURE, vid)

    def host_partitioned(self, hid: int) -> Outcome:
        out = self._inject("host partitioned", f"host {hid} cut off while its VMs keep running: fenced, then "
                           "recovered", Status.RECOVERED, "lab.host.partition", hid)
        return self._follow(out, Kind.HOST, hid)

    def detected(self, name: str, hid: int, mode: str, how: str) -> Outcome:
        out = self._inject(name, f"host {hid}: {how}", Status.RECOVERED, "lab.host.fail", hid, mode)
        return self._follow(out, Kind.HOST, hid)

    # Helpers -----------------------------------------------------------------------------------------------
    def _inject(self, name: str, what: str, expected: Status, method: str, *args: Any) -> Outcome:
        out = Outcome(name, what, expected, injected_at=time.time())
        lab_call(self.url, method, *args)
        return out

    def _follow(self, out: Outcome, kind: Kind, resource_id: int) -> Outcome:
        """Wait until the failure's incident is closed; collect what was done."""
        def closed() -> Incident | None:
            inc = self._incident(kind, resource_id, out.injected_at)
            return inc if inc is not None and not inc.status.is_open else None
        try:
            out.incident = wait_until(closed, self.timeout_s, what=f"the {kind.value} incident of {resource_id}")
        except WaitTimeout as exc:
            out.incident = self._incident(kind, resource_id, out.injected_at)
            out.error = out.error or str(exc)
        if out.incident is not None:
            records = self.store.vm_records(out.incident.id).values()
            out.actions.update(str(r.get("action", "?")) for r in records)
        return out

    def _incident(self, kind: Kind, resource_id: int, since: float) -> Incident | None:
        for inc in self.store.recent(100):
            if inc.kind is kind and inc.resource_id == resource_id and inc.opened_at >= since - 1:
                return inc
        return None

    def _hosts_by_cluster(self) -> dict[int, list[int]]:
        with self.lab.cloud.lock:
            hosts = sorted(self.lab.cloud.hosts.values(), key=lambda h: h.id)
            by_cluster: dict[int, list[int]] = {}
            for host in hosts:
                if host.vm_ids:
                    by_cluster.setdefault(host.cluster_id, []).append(host.id)
        if len(by_cluster.get(0, [])) < 2 or len(by_cluster.get(1, [])) < 3:
            raise RuntimeError("the scenario needs two clusters with at least 2 and 3 hosts running VMs")
        return by_cluster

    def _running_vm_on(self, hid: int) -> int:
        with self.lab.cloud.lock:
            host = self.lab.cloud.hosts[hid]
            for vid in sorted(host.vm_ids):
                vm = self.lab.cloud.vms[vid]
                if vm.state_name() == "ACTIVE/RUNNING" and host.state == HostState.MONITORED:
                    return vid
        raise RuntimeError(f"no RUNNING VM on host {hid}")

    def _settled(self) -> dict[str, Any]:
        """The oracle once no VM is in flight and none is lost (or what it says at the deadline)."""
        def settled() -> dict[str, Any] | None:
            oracle = lab_call(self.url, "lab.oracle", time.time())
            return oracle if not oracle["lost"] and not self._in_flight() else None
        try:
            found: dict[str, Any] = wait_until(settled, self.timeout_s, what="the cloud to settle")
            return found
        except WaitTimeout:
            latest: dict[str, Any] = lab_call(self.url, "lab.oracle", time.time())
            return latest

    def _summary(self) -> Summary:
        """Duplicates and lost VMs from the lab's truth, once the cloud has settled."""
        oracle = self._settled()
        return Summary(self.outcomes, list(oracle["duplicates"]), list(oracle["lost"]))

    def _in_flight(self) -> bool:
        with self.lab.cloud.lock:
            return any(vm.state == VmState.PENDING or (vm.state == VmState.ACTIVE and vm.state_name() not in
                       ("ACTIVE/RUNNING", "ACTIVE/UNKNOWN")) for vm in self.lab.cloud.vms.values())


def describe(out: Outcome) -> str:
    parts = [f"incident {out.incident.id} {out.incident.status.value}" if out.incident else "no incident"]
    if out.incident is not None and out.incident.extra.get("proof"):
        parts.append(f"proven dead by {out.incident.extra['proof']}")
    if out.detected_s is not None:
        parts.append(f"detected after {out.detected_s:.1f}s")
    if out.settled_s is not None:
        parts.append(f"settled after {out.settled_s:.1f}s")
    if out.actions:
        parts.append(", ".join(f"{n} x {a}" for a, n in sorted(out.actions.items())))
    if out.error:
        parts.append(f"ERROR: {out.error}")
    return "; ".join(parts)
