"""Every Redis key oneha reads or writes, in one place (the arq way): grep here before adding one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Resource = Literal["host", "vm"]

# Celery queues and task names: the subscriber sends tasks by name, so it never imports the workers' code.
HOST_QUEUE = "oneha.hosts"
VM_QUEUE = "oneha.vms"
TASK_RECOVER_HOST = "oneha.recover_host"
TASK_RECOVER_VM = "oneha.recover_vm"  # one VM of a host incident
TASK_VM_INCIDENT = "oneha.vm_incident"  # a VM failure or VM crash incident

BRIDGE_GROUP = "oneha-subscribers"


@dataclass(frozen=True)
class Keys:
    prefix: str = "oneha"

    # Incidents -------------------------------------------------------------------------------------------------
    @property
    def incident_seq(self) -> str:
        return f"{self.prefix}:incident:seq"

    def incident(self, incident_id: int | str) -> str:
        """Hash: the incident's fields."""
        return f"{self.prefix}:incident:{incident_id}"

    def incident_vms(self, incident_id: int | str) -> str:
        """Hash: vm id -> JSON record of what was done to that VM."""
        return f"{self.prefix}:incident:{incident_id}:vms"

    def incident_pending_vms(self, incident_id: int | str) -> str:
        """Set: VMs of a host incident whose recovery task has not finished yet."""
        return f"{self.prefix}:incident:{incident_id}:pending"

    def incident_started_vms(self, incident_id: int | str) -> str:
        """Set: VMs of a host incident whose recovery task has started at least once (the rest are still queued)."""
        return f"{self.prefix}:incident:{incident_id}:started"

    def incident_log(self, incident_id: int | str) -> str:
        """List: the audit trail, JSON entries."""
        return f"{self.prefix}:incident:{incident_id}:log"

    @property
    def incident_index(self) -> str:
        """Sorted set: incident id scored by the time it was opened (listing and retention)."""
        return f"{self.prefix}:incidents"

    def open_incident(self, resource: Resource, resource_id: int) -> str:
        """String: id of the one open incident of a host or VM. This key is the deduplication."""
        return f"{self.prefix}:open:{resource}:{resource_id}"

    def handled(self, resource: Resource) -> str:
        """Hash: resource id -> the closed incident that handled its current failure (suppresses repeats)."""
        return f"{self.prefix}:handled:{resource}"

    @property
    def paused(self) -> str:
        """String: JSON {at, reason} while an operator has paused all recovery (`oneha incidents pause`)."""
        return f"{self.prefix}:paused"

    @property
    def due(self) -> str:
        """Sorted set: open incident id scored by when it next needs a worker (grace end, lease expiry, recheck)."""
        return f"{self.prefix}:due"

    # Worker coordination ---------------------------------------------------------------------------------------
    def lock(self, resource: Resource, resource_id: int) -> str:
        return f"{self.prefix}:lock:{resource}:{resource_id}"

    def fencing_token(self, resource: Resource, resource_id: int) -> str:
        """Counter: the monotonically growing token of the lock above."""
        return f"{self.prefix}:token:{resource}:{resource_id}"

    def vm_recovering(self, vm_id: int) -> str:
        """String: the incident currently acting on a VM; a second one stands back."""
        return f"{self.prefix}:recovering:vm:{vm_id}"

    def vm_recoveries(self, vm_id: int) -> str:
        """Sorted set: times a VM failure was recovered (loop protection)."""
        return f"{self.prefix}:recoveries:vm:{vm_id}"

    @property
    def vm_queue_moving(self) -> str:
        """String: the last time (epoch s) a worker started a task from the VM queue (is the queue moving?)."""
        return f"{self.prefix}:vm_queue:moving"

    def placement_reserved(self, host_id: int) -> str:
        """Sorted set: room oneha took on a host for VMs it deploys there, "vm:cpu:mem" scored by when (epoch s);
        kept worker.placement_reservation_s (workers/placement.py)."""
        return f"{self.prefix}:placement:host:{host_id}"

    @property
    def host_failures(self) -> str:
        """Sorted set: recent host failures scored by time (storm guard)."""
        return f"{self.prefix}:host_failures"

    @property
    def oned_semaphore(self) -> str:
        """Sorted set: holders of an oned call slot scored by their expiry (global concurrency cap)."""
        return f"{self.prefix}:oned:slots"

    # Intake ------------------------------------------------------------------------------------------------------
    @property
    def bridge_stream(self) -> str:
        """Stream: events handed over by `oneha bridge`, read by subscribers through a consumer group."""
        return f"{self.prefix}:bridge:events"

    @property
    def heartbeat(self) -> str:
        """Hash: component name -> last time it was alive."""
        return f"{self.prefix}:heartbeat"

    # Detection (oneha detect) ------------------------------------------------------------------------------------
    @property
    def detect_instances(self) -> str:
        """Set: names of the detector instances that have published a view (pruned when their view expires)."""
        return f"{self.prefix}:detect:instances"

    def detect_view(self, instance: str) -> str:
        """Hash, short TTL: one detector's view, host id -> consecutive missed probes (votes only at or above the
        threshold count). Its existence is the instance's "I am alive"."""
        return f"{self.prefix}:detect:view:{instance}"

    def detect_decision(self, host_id: int) -> str:
        """String, lease: the detector instance deciding (proving) a suspect host right now."""
        return f"{self.prefix}:detect:decision:host:{host_id}"

    @property
    def detect_states(self) -> str:
        """Hash: host id -> JSON {state: ok|suspect|dead|isolated, since, proof, by, detail} (the live view)."""
        return f"{self.prefix}:detect:states"
