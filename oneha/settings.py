"""All of oneha's settings in one typed model: a TOML file plus `ONEHA_*` environment overrides.

Precedence, highest first: environment (`ONEHA_SECTION__FIELD`, e.g. `ONEHA_REDIS__URL`), the TOML file given with
`--config` (or `ONEHA_CONFIG`), the defaults below. OpenNebula's own conventions are honoured too: `ONE_XMLRPC` for the
endpoint and `ONE_AUTH` for the path of the `user:password` file. Credentials never come from the command line.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

HostAction = Literal["migrate", "recreate", "delete", "none"]
VmFailureAction = Literal["recreate", "delete", "none"]
VmCrashAction = Literal["resume", "none"]
VmPoweroffAction = Literal["resume", "off"]


class ConfigError(Exception):
    """The configuration cannot be used; the message says why. The CLI exits with code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterPolicy(_Strict):
    """What to do when a host or VM of a cluster fails. `[policy.default]`, overridden per `[policy.clusters.N]`."""

    host_action: HostAction = Field("recreate", description=(
        "migrate: `resched`, only for VMs on a shared system datastore; recreate: `recover 4` (disks recreated, "
        "state lost); delete: `recover 3`; none: fence and report only."))
    migrate_fallback: Literal["recreate", "none"] = Field("recreate", description=(
        "With host_action=migrate, what happens to a VM whose system datastore is not shared (its disks died with "
        "the host, so it cannot be migrated): recreate it, or leave it and report."))
    include_suspended: bool = Field(False, description=(
        "Also recover SUSPENDED and POWEROFF VMs of a failed host (host_error.rb's DoSuspended / -f)."))
    host_grace_s: float = Field(60.0, ge=0, description=(
        "How long a host must stay in ERROR before anything is done: tolerance to spurious network errors. "
        "A host back to MONITORED within it cancels the incident."))
    fencing: list[str] | Literal["none"] | None = Field(None, description=(
        "Fence command as an argument list (run without a shell; base64 host XML on stdin, exit 0 = fenced, "
        "OpenNebula's fence_host.sh contract), or \"none\" to skip fencing on purpose. Unset = fail closed: "
        "no VM of a failed host is recovered until fencing is configured."))
    fence_timeout_s: float = Field(60.0, gt=0, description="Time limit of one fence attempt.")
    fence_attempts: int = Field(3, ge=1, description="Fence attempts before the incident becomes fence_failed.")
    vm_failure_action: VmFailureAction = Field("recreate", description="For a VM in an LCM *_FAILURE state.")
    vm_failure_grace_s: float = Field(0.0, ge=0, description="Wait before acting on a failed VM.")
    vm_crash_action: VmCrashAction = Field("resume", description=(
        "For a VM in ACTIVE/UNKNOWN on a MONITORED host: resume boots it again on the same host."))
    vm_crash_grace_s: float = Field(60.0, ge=0, description="How long a VM must stay UNKNOWN on a healthy host.")
    vm_poweroff_action: VmPoweroffAction = Field("resume", description=(
        "For a VM that went POWEROFF without anyone asking (its last history record's ACTION is MONITOR: oned's "
        "monitor found the domain gone, e.g. a crash with the default MISSING_STATE, or a power blip shorter than "
        "host_grace_s): resume boots it again, counted by the VM loop protection; off leaves it off. An operator's "
        "`onevm poweroff` is never undone. A guest that powers itself off looks the same to oned and is resumed too: "
        "set off (or HA = \"NO\" on the VM) where guests are expected to stay off. Waits vm_crash_grace_s."))
    placement: Literal["oneha", "scheduler"] = Field("oneha", description=(
        "Who places a VM of a failed host once it is PENDING again (host_action = recreate): oneha deploys it "
        "itself (`one.vm.deploy`, capacity enforced) on a MONITORED host of its cluster with room, most free "
        "first, without waiting for oned's scheduler window; a VM whose constraints oneha cannot evaluate exactly "
        "(SCHED_REQUIREMENTS, SCHED_DS_REQUIREMENTS, VM groups, PCI devices, NUMA pinning) or that fits nowhere is "
        "left to the scheduler. scheduler: oned's scheduler places every VM (the behaviour before issue 13)."))


class ClusterOverride(_Strict):
    """Any subset of ClusterPolicy's fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host_action: HostAction | None = None
    migrate_fallback: Literal["recreate", "none"] | None = None
    include_suspended: bool | None = None
    host_grace_s: float | None = Field(None, ge=0)
    fencing: list[str] | Literal["none"] | None = None
    fence_timeout_s: float | None = Field(None, gt=0)
    fence_attempts: int | None = Field(None, ge=1)
    vm_failure_action: VmFailureAction | None = None
    vm_failure_grace_s: float | None = Field(None, ge=0)
    vm_crash_action: VmCrashAction | None = None
    vm_crash_grace_s: float | None = Field(None, ge=0)
    vm_poweroff_action: VmPoweroffAction | None = None
    placement: Literal["oneha", "scheduler"] | None = None


class Policy(_Strict):
    default: ClusterPolicy = ClusterPolicy()
    clusters: dict[int, ClusterOverride] = Field(default_factory=dict, description="Overrides by cluster ID.")

    def for_cluster(self, cluster_id: int) -> ClusterPolicy:
        override = self.clusters.get(cluster_id)
        if override is None:
            return self.default
        return self.default.model_copy(update=override.model_dump(exclude_none=True))


class OnedSettings(_Strict):
    endpoint: str = Field(default_factory=lambda: os.environ.get("ONE_XMLRPC", "http://localhost:2633/RPC2"),
                          description="oned's XML-RPC endpoint (http:// or https://).",
                          json_schema_extra={"doc_default": "$ONE_XMLRPC, else http://localhost:2633/RPC2"})
    auth_file: Path = Field(
        default_factory=lambda: Path(os.environ.get("ONE_AUTH", Path.home() / ".one" / "one_auth")),
        description="File holding `user:password` (OpenNebula's ONE_AUTH convention).",
        json_schema_extra={"doc_default": "$ONE_AUTH, else ~/.one/one_auth"})
    session: SecretStr | None = Field(None, description=(
        "`user:password` directly; only from the environment (ONEHA_ONED__SESSION), never from a file in git."))
    https_verify: bool | str = Field(True, description="Verify oned's TLS certificate; or a CA bundle path.")
    connect_timeout_s: float = Field(3.0, gt=0, description="A dead oned fails the call after this long.")
    read_timeout_s: float = Field(15.0, gt=0, description=(
        "A hung oned fails the call after this long: a read is retried, a mutating call's outcome is unknown "
        "(the VM is re-read and the flow decides again; it is never sent again blindly)."))
    abandon_after_s: float = Field(60.0, gt=0, description=(
        "A call oned has not answered keeps its slot of `max_concurrent_calls` (oned may still be working on it) "
        "and, if it changes a VM, keeps any other change of that VM back, for this long; then its connection is "
        "closed. At least read_timeout_s."))
    max_concurrent_calls: int = Field(8, ge=1, description=(
        "Cap on oned calls in flight across the whole worker pool (a Redis semaphore)."))
    call_attempts: int = Field(5, ge=1, description="Attempts for a call failing transiently.")
    backoff_base_s: float = Field(0.2, gt=0, description="First retry waits up to this (full jitter), doubling.")
    backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between two attempts.")
    infoset_chunk_vms: int = Field(500, ge=1, description=(
        "VM IDs per `one.vmpool.infoset` call of a worker (a host's VMs are read in calls of at most this many)."))

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # pyone would take anything else for a gRPC address and fail on every call, for ever (REFERENCE §5).
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL (e.g. http://localhost:2633/RPC2), got {value!r}")
        return value
    @model_validator(mode="after")
    def _abandon_after_read_timeout(self) -> OnedSettings:
        if self.abandon_after_s < self.read_timeout_s:
            raise ValueError("abandon_after_s must be at least read_timeout_s")
        return self

    def read_session(self) -> str:
        if self.session is not None:
            return self.session.get_secret_value()
        try:
            text = self.auth_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read oned credentials from {self.auth_file}: {exc.strerror}") from exc
        if ":" not in text:
            raise ConfigError(f"{self.auth_file} must hold `user:password`")
        return text.splitlines()[0]


class RedisSettings(_Strict):
    url: str = Field("redis://127.0.0.1:6379/0", description=(
        "Incident store, locks and due times. Redis Sentinel: `sentinel://h1:26379;sentinel://h2:26379;"
        "sentinel://h3:26379` with sentinel_master (the broker uses the same URL unless broker.url is set)."))
    key_prefix: str = Field("oneha", description="Prefix of every key oneha writes.")
    sentinel_master: str | None = Field(None, description="Master name when `url` lists Redis Sentinels.")
    wait_replicas: int = Field(0, ge=0, description=(
        "Replicas that must acknowledge (Redis WAIT) a lock before its holder acts on it. Replication is "
        "asynchronous: without this, a lock and its fencing token acknowledged by a master that dies can vanish in "
        "the failover, and the promoted replica may hand the same token out again. Set 1 with a replica and "
        "Sentinel; a lock not acknowledged in wait_timeout_ms is given back and taken again later."))
    wait_timeout_ms: int = Field(1000, ge=1, description="How long a lock waits for its replica acknowledgements.")
    socket_timeout_s: float = Field(5.0, gt=0, description=(
        "A Redis call without an answer fails after this long (the loops handle the error; no hang)."))
    connect_timeout_s: float = Field(2.0, gt=0, description="A Redis connection attempt fails after this long.")
    health_check_interval_s: int = Field(30, ge=0, description=(
        "An idle connection is pinged before reuse after this long (0: never)."))

    @model_validator(mode="after")
    def _wait_fits_in_a_call(self) -> RedisSettings:
        # A lock's WAIT is one Redis call: longer than socket_timeout_s, it would fail as a lost connection.
        if self.wait_timeout_ms >= self.socket_timeout_s * 1000:
            raise ValueError("wait_timeout_ms must be shorter than socket_timeout_s")
        return self


class BrokerSettings(_Strict):
    url: str | None = Field(None, description="Celery broker URL (redis:// or amqp://). Default: redis.url.")
    visibility_timeout_s: int = Field(1800, ge=600, description=(
        "Redis broker: an unacked message is delivered again after this long (REFERENCE §6). Task time limits "
        "stay below it; a dead worker's incident is picked up sooner by the due-time watchdog."))
    sentinel_master: str | None = Field(None, description=(
        "Master name when `url` lists Redis Sentinels (`sentinel://host:26379;sentinel://host2:26379`). "
        "Default: redis.sentinel_master when the broker is redis.url."))


class SubscriberSettings(_Strict):
    zmq_endpoints: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:2101"], description=(
        "one_hm publishers; list every front-end of an HA cluster (only the leader publishes)."))
    zmq_rcvhwm: int = Field(100_000, ge=1, description=(
        "Receive high-water mark (messages); lowered to what zmq_queue_bytes allows."))
    zmq_queue_bytes: int = Field(128 << 20, ge=1 << 20, description=(
        "Memory the ZeroMQ receive queue may hold: every frame is capped (ZMQ_MAXMSGSIZE) at the base64 size of "
        "max_event_bytes, and the high-water mark becomes zmq_queue_bytes / that (96 messages with the defaults; "
        "a lower max_event_bytes queues more events in the same memory)."))
    max_event_bytes: int = Field(1 << 20, ge=4096, description=(
        "Larger event payloads are rejected; a ZeroMQ frame larger than its base64 makes libzmq drop the "
        "connection (oneha reconnects at once; what was in flight is left to the reconciler)."))
    buffer_events: int = Field(10_000, ge=1, description="Events kept in memory while Redis is unreachable.")
    buffer_bytes: int = Field(64 << 20, ge=1 << 20, description=(
        "...and at most about this much memory of decoded events."))
    reconcile_interval_s: float = Field(30.0, gt=0, description="Scan of hosts in ERROR and their VMs.")
    full_scan_interval_s: float = Field(300.0, gt=0, description=(
        "Scan of the whole VM pool (paged) for failure states and crashes on healthy hosts."))
    reconcile_poke_min_s: float = Field(2.0, gt=0, description=(
        "An event oned contradicted brings the next reconcile pass forward, but never to less than this after the "
        "last one began (forged floods poke too)."))
    reconcile_infoset_chunk_vms: int = Field(2000, ge=1, description=(
        "VM IDs per `one.vmpool.infoset` call of the reconciler."))
    reconcile_page_vms: int = Field(2000, ge=1, description=(
        "VM ID range per `one.vmpool.info` page of the full scan."))
    dispatch_retry_s: float = Field(5.0, gt=0, description=(
        "A failed hand-over to the broker (broker down) is retried this soon, not after a whole task_lease_s."))
    bridge_stale_consumer_s: float = Field(3600.0, gt=0, description=(
        "A bridge-stream consumer idle this long with nothing pending (a subscriber gone) is deleted."))
    zmq_batch_messages: int = Field(1000, ge=1, description=(
        "ZeroMQ messages taken per wake-up (one Redis round trip per batch) before the stop flag is looked at."))
    zmq_batch_s: float = Field(0.2, gt=0, description=(
        "...or fewer, after this long (a flood of costly hostile frames must not hide the stop flag)."))
    zmq_batch_bytes: int = Field(16 << 20, ge=1 << 20, description=(
        "...or fewer, once the decoded events of the batch hold about this much memory."))
    dispatch_interval_s: float = Field(0.5, gt=0, description="How often due incidents are handed to workers.")
    metrics_port: int | None = Field(9641, description="Prometheus metrics port; none to disable.")
    metrics_bind: str = Field("127.0.0.1", description="Address the metrics port listens on.")


class WorkerSettings(_Strict):
    dry_run: bool = Field(False, description="Do everything up to the mutating oned call, log it, change nothing.")
    lock_ttl_s: float = Field(30.0, gt=0, description="Host/VM lock lease; renewed while the flow runs.")
    task_lease_s: float = Field(60.0, gt=0, description=(
        "An incident whose worker went silent this long is dispatched again (the flows are idempotent)."))
    confirm_timeout_s: float = Field(120.0, gt=0, description="Deadline for a VM to be seen leaving the host.")
    accepted_noop_s: float = Field(5.0, gt=0, description=(
        "A VM read this long after oned accepted a mutating call and found exactly as before (state, LCM state, "
        "history record, RESCHED) is taken as a call oned accepted and did nothing with (its LCM, which acts after "
        "the answer, only logs a state it does not handle): the flow reads again and decides again (a new attempt) "
        "instead of waiting out confirm_timeout_s. Keep it above how long oned's LCM may lag under load."))
    offline_confirm_s: float = Field(10.0, gt=0, description=(
        "A host proven dead by a detector is set OFFLINE in oned before any of its VMs is touched: how long the "
        "flow reads the host back for STATE OFFLINE after a `one.host.status` whose outcome is unknown (no answer). "
        "Not confirmed by then: the incident is held with an alert and tried again every storm_recheck_s."))
    unknown_wait_s: float = Field(60.0, gt=0, description=(
        "host_action = migrate on a host proven dead by a detector: the host is set OFFLINE, then DISABLED, so that "
        "monitord probes it at once, fails, and sets its RUNNING VMs UNKNOWN (a migration from UNKNOWN never "
        "contacts the dead host; one from RUNNING would save the VM there first). How long a VM task waits for its "
        "VM to show UNKNOWN before it takes migrate_fallback instead (oned's probe of a dead host fails after "
        "about 15 s with the default IM_MAD -r 3 and an SSH that gives up in 3 s)."))
    vm_attempts: int = Field(3, ge=1, description="Attempts to recover one VM before it is reported failed.")
    placement_wait_s: float = Field(60.0, gt=0, description=(
        "placement = oneha: how long a VM task waits for its recreated VM to be PENDING (oned's cleanup on the "
        "dead host runs first) before leaving it to oned's scheduler."))
    placement_reservation_s: float = Field(30.0, gt=0, description=(
        "placement = oneha: how long room oneha took on a host for a VM is kept off the host's free capacity "
        "(one.vm.deploy's capacity check is not a reservation, and several workers place at once). Only "
        "reservations newer than a host pool read minus 5 s are counted against that read (older ones oned "
        "counts already); keep it well above the oned call time under load."))
    storm_max_share: float = Field(0.4, gt=0, le=1, description=(
        "Hold host incidents when more than this share of a cluster's hosts are in ERROR at once."))
    storm_max_hosts: int = Field(5, ge=1, description="...or more than this many hosts failed within storm_window_s.")
    storm_window_s: float = Field(120.0, gt=0, description="Window of the storm_max_hosts count.")
    storm_recheck_s: float = Field(10.0, gt=0, description="How often a held incident re-checks the condition.")
    vm_failure_max_recoveries: int = Field(3, ge=1, description="Loop protection: recoveries of one VM per window.")
    vm_failure_window_s: float = Field(3600.0, gt=0, description="Window of vm_failure_max_recoveries.")
    fence_env: list[str] = Field(default_factory=list, description=(
        "Names of further environment variables passed on to fence commands. They get only PATH, LANG, LANGUAGE, "
        "TZ, LC_* and what the shipped fence scripts read (ONEHA_FENCE_CRED_DIR, ONEHA_FENCE_DEADLINE_S, "
        "ONEHA_FENCE_POLL_S, ONEHA_FENCE_PYTHON, ONEHA_IPMI_INTERFACE, ONEHA_IPMITOOL, ONEHA_CURL, "
        "ONEHA_REDFISH_TIMEOUT_S): never the worker's own credentials."))
    metrics_port: int | None = Field(9642, description="Prometheus metrics port of a worker node; none to disable.")
    pause_check_s: float = Field(0.5, gt=0, description=(
        "How stale a worker process's view of `oneha pause` may be: a pause acts within this long."))
    task_max_retries: int = Field(5, ge=0, description=(
        "Celery retries of a task that failed transiently (oned unreachable after the gateway's own retries); past "
        "them the incident stays due and is dispatched again after its lease."))
    redis_outage_s: float = Field(30.0, gt=0, description=(
        "A task rides out a Redis restart or Sentinel failover in place for this long (Redis is also the broker: "
        "a Celery retry could not even be published) before it gives up."))
    metrics_bind: str = Field("127.0.0.1", description="Address the metrics port listens on.")


class DetectSettings(_Strict):
    """`oneha detect`: probes every host's management ports, agrees on suspects through Redis, proves death."""

    instance: str | None = Field(None, description=(
        "This detector's name in Redis and in incidents (`detector:<instance>`). Default: the machine's hostname. "
        "Every instance must have its own."))
    ports: list[int] = Field(default_factory=lambda: [22, 16509], min_length=1, description=(
        "Management ports probed on every host (ONEHA_MGMT_ADDRESS of the host template, else its NAME). A host "
        "answers when every port accepts a connection; port 22 must also send its \"SSH-\" banner within "
        "probe_timeout_s (a hung kernel accepts TCP connections but sends nothing)."))
    probe_interval_s: float = Field(1.0, gt=0, description="One probe round of every host, this often.")
    probe_timeout_s: float = Field(0.8, gt=0, description=(
        "A port that has not answered (connected, banner read) within this long is a miss. Below probe_interval_s."))
    probe_concurrency: int = Field(2000, ge=1, description=(
        "Connections in flight at once (one event loop; mind the process's open-file limit)."))
    probe_source_address: str | None = Field(None, description=(
        "Source address the probes bind to (a multi-homed front-end probes from its management network address)."))
    hosts_refresh_s: float = Field(5.0, gt=0, description="How often the host list is read from oned.")
    misses_to_suspect: int = Field(3, ge=1, description=(
        "Consecutive missed probe rounds after which this instance votes a host suspect."))
    quorum: int = Field(2, ge=1, description=(
        "Alive detector instances that must each have missed a host misses_to_suspect times in a row before it "
        "is suspect. Run at least this many instances, on different machines."))
    alive_ttl_s: float = Field(3.0, gt=0, description=(
        "An instance's published view (and so its vote) expires this long after its last round."))
    storm_max_share: float = Field(0.5, gt=0, le=1, description=(
        "An instance that misses more than this share of all hosts at once (and at least storm_min_hosts) "
        "suspects itself: it withdraws its votes and alerts (its own network is the likelier fault). Below it, a "
        "mass failure is still only recovered once each host is proven dead (BMC Off or a stale heartbeat; a "
        "beating heartbeat vetoes fencing)."))
    storm_min_hosts: int = Field(2, ge=1, description="...the storm guard needs at least this many hosts missed.")
    decision_lease_s: float = Field(15.0, gt=0, description=(
        "One instance decides a suspect host at a time (a lease in Redis, renewed while it decides): a detector "
        "that dies mid-decision is replaced after this long."))
    decision_retry_s: float = Field(30.0, gt=0, description=(
        "A fence command that failed for a suspect host (BMC unreachable) is tried again after this long; meanwhile "
        "the storage heartbeat alone may prove death."))
    heartbeat_dir: Path | None = Field(None, description=(
        "The hosts' storage heartbeats, `<heartbeat_dir>/<host NAME>` (the agents write them on shared storage). "
        "None: only the BMC can prove death."))
    heartbeat_stale_s: float = Field(25.0, gt=0, description=(
        "A heartbeat unchanged this long (on this detector's own clock) proves death only if the host's published "
        "self-fence deadline plus heartbeat_margin_s fits in it (oneha/timing_rule.py); published in "
        "`<heartbeat_dir>/detector.json` for the agents' start-up check."))
    heartbeat_margin_s: float = Field(4.0, ge=0, description=(
        "Safety margin added to a host's self-fence deadline (clock rates, the reset itself)."))
    heartbeat_fresh_s: float = Field(5.0, gt=0, description=(
        "A heartbeat that changed within this long is beating: its host is alive, so it is never fenced (isolated)."))
    beacon_port: int | None = Field(9650, description=(
        "TCP port the agents connect to once per beat (\"a detector sees me\"); none to disable."))
    beacon_bind: str = Field("0.0.0.0", description="Address the beacon listens on (the agents' network).")  # noqa: S104
    metrics_port: int | None = Field(9643, description="Prometheus metrics port; none to disable.")
    metrics_bind: str = Field("127.0.0.1", description="Address the metrics port listens on.")

    @model_validator(mode="after")
    def _timeout_in_interval(self) -> DetectSettings:
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError("probe_timeout_s must be shorter than probe_interval_s")
        if self.heartbeat_fresh_s >= self.heartbeat_stale_s:
            raise ValueError("heartbeat_fresh_s must be shorter than heartbeat_stale_s")
        return self


class AuditSettings(_Strict):
    retention_s: int = Field(14 * 86400, ge=60, description="How long closed incidents are kept.")
    max_incidents: int = Field(10_000, ge=10, description="Closed incidents kept at most.")


def parse_endpoint(text: str) -> tuple[str, int]:
    """"addr:port" (IPv6 as "[addr]:port") -> (addr, port). An IP address, never a name: the agent's loop must not
    wait for DNS, and a DNS outage must not look like a partition."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: give an IP address and a port, as addr:port or [v6addr]:port") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return host, int(port)


class AgentSettings(_Strict):
    """`oneha agent`, on each hypervisor (docs/agent.md). The timing rule is oneha/timing_rule.py's."""

    host_name: str | None = Field(None, min_length=1, description=(
        "This host's NAME in oned (the heartbeat file's name, which detectors look up). Default: the hostname."))
    heartbeat_dir: Path | None = Field(None, description=(
        "Directory on the shared storage (e.g. inside the system datastore's mount) where this host's heartbeat "
        "and the detectors' detector.json live. Required; never created by the agent: a missing directory means "
        "the storage is not mounted."))
    detectors: list[str] = Field(default_factory=list, description=(
        "Detector beacon endpoints as \"addr:port\" (IP addresses, port detect.beacon_port, 9650 by default); any "
        "one accepting a TCP connection means a detector sees this host. Required with isolation = \"fence\"."))
    beat_interval_s: float = Field(1.0, gt=0, description="Heartbeat write and checks, once per beat.")
    loss_timeout_s: float = Field(10.0, gt=0, description=(
        "The watchdog is petted only while the last heartbeat write (and, with isolation = \"fence\", the last "
        "detector contact) is younger than this."))
    watchdog_timeout_s: float = Field(10.0, ge=1, description=(
        "Set on the watchdog device (whole seconds, WDIOC_SETTIMEOUT) and read back; the host resets this long "
        "after the last pet."))
    watchdog: Literal["device", "none"] = Field("device", description=(
        "\"device\": watchdog_device (if absent, `modprobe softdog` is tried). \"none\": no watchdog; the "
        "heartbeat then says it guarantees nothing, so detectors never use it as proof of death."))
    watchdog_device: Path = Field(Path("/dev/watchdog"), description=(
        "The watchdog device. Not the one systemd's RuntimeWatchdogSec holds."))
    isolation: Literal["fence", "storage-only"] = Field("fence", description=(
        "\"fence\": stop petting when cut off from the storage or from every detector; \"storage-only\": "
        "from the storage only (a management-network partition leaves the host running)."))

    def name(self) -> str:
        return self.host_name or socket.gethostname()

    @field_validator("host_name")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or value.startswith(".") or "\0" in value):
            raise ValueError(f"{value!r} cannot be a file name in the heartbeat directory")
        return value

    @field_validator("detectors")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_endpoint(text)
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONEHA_", env_nested_delimiter="__", extra="forbid",
                                      frozen=True)

    oned: OnedSettings = Field(default_factory=OnedSettings)
    redis: RedisSettings = RedisSettings()
    broker: BrokerSettings = BrokerSettings()
    policy: Policy = Policy()
    subscriber: SubscriberSettings = SubscriberSettings()
    worker: WorkerSettings = WorkerSettings()
    audit: AuditSettings = AuditSettings()
    detect: DetectSettings = DetectSettings()
    agent: AgentSettings = Field(default_factory=AgentSettings)

    @property
    def broker_url(self) -> str:
        return self.broker.url or self.redis.url

    def broker_redis(self) -> RedisSettings:
        """A redis:// broker as a Redis client sees it: its URL with `[redis]`'s timeouts."""
        return self.redis.model_copy(update={"url": self.broker_url, "sentinel_master": None})

    @model_validator(mode="after")
    def _fencing_needs_commands(self) -> Settings:
        named: list[tuple[object, ClusterPolicy | ClusterOverride]] = [("default", self.policy.default)]
        named += list(self.policy.clusters.items())
        for name, policy in named:
            fencing = policy.fencing
            if isinstance(fencing, list) and not fencing:
                raise ValueError(f"policy.{name}.fencing: give a command list or \"none\"")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("ONEHA_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @cached_property
    def oned_session(self) -> str:
        return self.oned.read_session()


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Load and validate; any problem becomes a ConfigError with a readable message."""
    previous = os.environ.get("ONEHA_CONFIG")
    try:
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            os.environ["ONEHA_CONFIG"] = str(path)
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read config: {exc}") from exc
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop("ONEHA_CONFIG", None)
            else:
                os.environ["ONEHA_CONFIG"] = previous


def _explain(exc: ValidationError) -> str:
    lines = [f"invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)
