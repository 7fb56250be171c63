"""The detector against the lab (real redis-server, real lab XML-RPC, real sockets on every host's address, real
Redfish BMCs, the shipped fence_redfish.sh): each failure mode ends in the state the issue asks for, judged by the
lab's truth — no VM runs twice, no healthy host is ever powered off. Timings scaled down (probe 0.2 s)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from oneha import redisconn
from oneha.detect.service import Detector
from oneha.incidents import IncidentStore, Kind
from oneha.keys import Keys
from oneha.lab.cloud import Cloud
from oneha.lab.sim import LabCloud
from oneha.opennebula import OnedClient, make_server
from oneha.settings import (
    ClusterPolicy,
    DetectSettings,
    OnedSettings,
    Policy,
    RedisSettings,
    Settings,
)
from oneha.waiting import wait_until

hostside = pytest.importorskip("oneha.lab.hostside", reason="needs sushy-tools (the lab extra)")
HostSide, HostSideOptions, address = hostside.HostSide, hostside.HostSideOptions, hostside.address

ROOT = Path(__file__).resolve().parent.parent
FENCE_REDFISH = ROOT / "deploy" / "fence" / "fence_redfish.sh"
HOSTS = 30
PROBE_S = 0.2
SOURCES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
# host ids per test (the lab is shared by the module; each test restores its hosts)
PSU, HANG, FLAP, PARTITION, POWER_LOSS, DISAGREE, CUT_OFF_PSU, KILLED, STORAGE = 0, 1, 2, 3, 4, 5, 6, 7, 8




WHY_NOT = pytest.importorskip("oneha.lab.detection").unavailable()  # ports 22/443/16509 on 127.50.x.y, openssl
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCloud]:
    # Each host's agent model beats every 0.1 s with a self-fence deadline of 0.1 + 0.4 + 0.3 = 0.8 s (+ margin 0.5
    # fits heartbeat_stale_s 2). Isolation "storage-only": these agents arm on storage alone (the detectors here run
    # no beacon) and a management partition leaves the host running (isolated, never fenced). The flapping link is
    # down 0.3 s at a time: shorter than 3 probes of 0.2 s.
    options = HostSideOptions(bmc_delay_s=(0.3, 0.6), heartbeat_s=0.1, flap_period_s=0.3, loss_timeout_s=0.4,
                              watchdog_timeout_s=0.3, isolation="storage-only")
    with LabCloud(hosts=HOSTS, vms=2 * HOSTS, monitoring_interval_s=60.0, host_side=options) as cloud:
        yield cloud


def detect_settings(lab: LabCloud, redis_url: str, **detect: Any) -> Settings:
    side = lab.host_side
    assert side is not None
    options: dict[str, Any] = dict(
        probe_interval_s=PROBE_S, probe_timeout_s=0.15, misses_to_suspect=3, quorum=2, alive_ttl_s=1.0,
        hosts_refresh_s=1.0, decision_lease_s=1.5, decision_retry_s=5.0, heartbeat_dir=side.heartbeat_dir,
        heartbeat_stale_s=2.0, heartbeat_margin_s=0.5, heartbeat_fresh_s=0.6, beacon_port=None, metrics_port=None)
    options.update(detect)
    policy = ClusterPolicy(fencing=["bash", str(FENCE_REDFISH)], fence_timeout_s=8.0, fence_attempts=1)
    return Settings(oned=OnedSettings(endpoint=lab.rpc_url, session=lab.session), redis=RedisSettings(url=redis_url),
                    policy=Policy(default=policy), detect=DetectSettings(**options))


@pytest.fixture(autouse=True)
def fence_env(lab: LabCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """What fence_redfish.sh reads (passed on by oneha.workers.fence.fence_env)."""
    assert lab.host_side is not None
    monkeypatch.setenv("ONEHA_FENCE_CRED_DIR", str(lab.host_side.cred_dir))
    monkeypatch.setenv("ONEHA_FENCE_POLL_S", "0.1")
    monkeypatch.setenv("ONEHA_FENCE_DEADLINE_S", "6")


class Fleet:
    """Detector instances as asyncio tasks on one event loop in a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(64))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: dict[str, tuple[Detector, asyncio.Event, concurrent.futures.Future[None]]] = {}

    def start(self, settings: Settings, name: str) -> Detector:
        o = settings.oned
        oned = OnedClient(make_server(o.endpoint, settings.oned_session, o.connect_timeout_s, o.read_timeout_s))
        source = SOURCES[name]
        settings = settings.model_copy(update={"detect": settings.detect.model_copy(
            update={"probe_source_address": source})})
        detector = Detector(settings, redisconn.client(settings.redis), oned, name)

        async def event() -> asyncio.Event:
            return asyncio.Event()

        stop = asyncio.run_coroutine_threadsafe(event(), self.loop).result(5)
        self.running[name] = (detector, stop, asyncio.run_coroutine_threadsafe(detector.run(stop), self.loop))
        return detector

    def stop(self, name: str) -> None:
        _, stop, future = self.running.pop(name)
        self.loop.call_soon_threadsafe(stop.set)
        future.result(10)

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture()
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        f.close()


@dataclass
class World:
    lab: LabCloud
    cloud: Cloud
    side: Any
    store: IncidentStore
    lost_before: set[int]  # VMs of hosts failed by earlier tests (restoring a host does not restart them)


@pytest.fixture()
def world(lab: LabCloud, redis_url: str) -> Iterator[World]:
    assert lab.host_side is not None
    w = World(lab, lab.cloud, lab.host_side, IncidentStore(redisconn.client(RedisSettings(url=redis_url)), Keys()),
              set(lab.cloud.oracle()["lost"]))
    failed: list[int] = []
    yield w
    for hid in range(HOSTS):
        if w.side.hosts[hid].mode != "ok" or w.side.hosts[hid].bmc_power != "On":
            failed.append(hid)
            w.side.restore(hid)
    for source in SOURCES.values():
        w.side.block_source(source, blocked=False)


def state(w: World, hid: int) -> dict[str, Any]:
    raw = w.store.r.hget(w.store.keys.detect_states, str(hid))
    return json.loads(raw) if raw else {"state": "ok"}


def host_incidents(w: World, hid: int) -> list[Any]:
    return [i for i in w.store.recent(100) if i.kind is Kind.HOST and i.resource_id == hid]


def all_running(w: World) -> None:
    wait_until(lambda: all(s.net == "up" for s in w.side.hosts.values()), 5, what="every host up")


def assert_safe(w: World, failed: set[int]) -> None:
    """The lab's truth: no VM runs twice, every other host kept its power and its VMs."""
    oracle = w.cloud.oracle()
    assert oracle["duplicates"] == []
    for hid, sig in w.side.hosts.items():
        if hid not in failed:
            assert sig.bmc_power == "On" and w.cloud.hosts[hid].power != "off", f"healthy host {hid} powered off"
    lost_hosts = {w.cloud.vms[v].hid for v in set(oracle["lost"]) - w.lost_before}
    assert lost_hosts <= failed, f"VMs lost on hosts that did not fail: {lost_hosts - failed}"


def settle(fleet: Fleet, rounds: int = 5) -> None:
    """Wait until every running detector has done `rounds` probe rounds (rounds, not time: no sleeps)."""
    start = {n: d.rounds for n, (d, _, _) in fleet.running.items()}
    wait_until(lambda: all(d.rounds >= start[n] + rounds for n, (d, _, _) in fleet.running.items()), 10,
               what=f"{rounds} probe rounds")


# --- the proofs ------------------------------------------------------------------------------------------------

def test_psu_failure_bmc_off_is_dead_with_proof_bmc(world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    failed_at = time.monotonic()
    world.side.fail(PSU, "psu")
    wait_until(lambda: state(world, PSU)["state"] == "dead", 10, what="psu host proven dead")
    took = time.monotonic() - failed_at
    incidents = host_incidents(world, PSU)
    assert len(incidents) == 1 and incidents[0].extra["proof"] == "bmc" and "fenced_at" in incidents[0].extra
    assert incidents[0].source in ("detector:a", "detector:b") and state(world, PSU)["proof"] == "bmc"
    print(f"\npsu: proven dead {took:.2f}s after the power cut (probe {PROBE_S}s x 3, quorum 2)")
    assert_safe(world, {PSU})


def test_kernel_hang_bmc_on_is_fenced_then_dead(world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.fail(HANG, "kernel_hang")
    assert world.side.hosts[HANG].bmc_power == "On"  # connects, sends nothing: only the banner check sees it
    wait_until(lambda: state(world, HANG)["state"] == "dead", 10, what="hung host fenced and proven dead")
    assert world.side.hosts[HANG].bmc_power == "Off"  # the detector powered it off through its BMC
    incidents = host_incidents(world, HANG)
    assert len(incidents) == 1 and incidents[0].extra["proof"] == "bmc"
    assert_safe(world, {HANG})


def test_power_loss_bmc_dead_is_proven_by_the_stale_heartbeat(world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.fail(POWER_LOSS, "power_loss")
    wait_until(lambda: state(world, POWER_LOSS)["state"] == "dead", 15, what="proven dead by the heartbeat")
    incidents = host_incidents(world, POWER_LOSS)
    assert len(incidents) == 1 and incidents[0].extra["proof"] == "heartbeat"
    assert "BMC: failed" in incidents[0].extra["proof_detail"]
    assert_safe(world, {POWER_LOSS})


def test_power_loss_without_an_agent_is_never_proven(world: World, fleet: Fleet, redis_url: str,
                                                     tmp_path: Path) -> None:
    """BMC dead and no heartbeat (no agent): unprovable; the detector alerts and waits for oned."""
    settings = detect_settings(world.lab, redis_url, heartbeat_dir=tmp_path)  # an empty directory: no agents
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.fail(POWER_LOSS, "power_loss")
    wait_until(lambda: "unproven" in state(world, POWER_LOSS).get("detail", ""), 15, what="unproven")
    settle(fleet, 15)
    assert state(world, POWER_LOSS)["state"] == "suspect" and "waits for oned" in state(world, POWER_LOSS)["detail"]
    assert host_incidents(world, POWER_LOSS) == []
    assert_safe(world, {POWER_LOSS})


def test_a_storage_only_partition_self_fences_and_only_then_is_proven_dead(world: World, fleet: Fleet,
                                                                            redis_url: str) -> None:
    """The host still answers its management ports but has lost its storage: never suspect while it runs; its agent
    stops petting, the watchdog resets it (its VMs stop); only then is it suspect, and proven dead (BMC)."""
    settings = detect_settings(world.lab, redis_url)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    vms = set(world.cloud.hosts[STORAGE].vm_ids)
    assert vms
    world.side.fail(STORAGE, "storage_partition")
    seen_before_reset: set[str] = set()

    def reset() -> bool:
        if world.side.hosts[STORAGE].resets:
            return True
        seen_before_reset.add(state(world, STORAGE)["state"])
        return False

    wait_until(reset, 10, interval_s=0.02, backoff=1.0, what="the agent's watchdog resets the host")
    assert seen_before_reset == {"ok"}, seen_before_reset  # running VMs: never suspect, never fenced
    with world.cloud.lock:
        assert not any(STORAGE in world.cloud.running.get(v, set()) for v in vms)  # the reset stopped them
    wait_until(lambda: state(world, STORAGE)["state"] == "dead", 15, what="the reset host proven dead")
    incidents = host_incidents(world, STORAGE)
    assert len(incidents) == 1 and incidents[0].extra["proof"] in ("bmc", "heartbeat")
    assert_safe(world, {STORAGE})


# --- what must never be called dead ------------------------------------------------------------------------------

def test_a_flapping_link_shorter_than_the_threshold_is_never_suspect(world: World, fleet: Fleet,
                                                                    redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    a, b = fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.fail(FLAP, "flapping")
    seen: set[str] = set()
    most = 0
    deadline = a.rounds + 25  # 5 s of flapping: about 8 outages of 0.3 s
    while a.rounds < deadline:
        seen.add(state(world, FLAP)["state"])
        most = max(most, a.misses.counts.get(FLAP, 0), b.misses.counts.get(FLAP, 0))
        wait_until(lambda r=a.rounds: a.rounds > r, 5, what="a round")
    assert most >= 1, "the flapping link never showed"
    assert seen == {"ok"} and host_incidents(world, FLAP) == []
    assert_safe(world, set())


def test_a_management_partition_with_the_heartbeat_beating_is_isolated_never_fenced(
        world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.fail(PARTITION, "mgmt_partition")  # BMC reachable: fencing it would be possible, and wrong
    wait_until(lambda: state(world, PARTITION)["state"] == "isolated", 10, what="isolated")
    settle(fleet, 15)  # longer than heartbeat_stale_s: still beating, still isolated
    assert state(world, PARTITION)["state"] == "isolated" and "waits for oned" in state(world, PARTITION)["detail"]
    assert host_incidents(world, PARTITION) == []
    assert world.side.hosts[PARTITION].bmc_power == "On"
    assert_safe(world, set())  # its VMs still run, never twice
    world.side.restore(PARTITION)
    wait_until(lambda: state(world, PARTITION)["state"] == "ok", 10, what="ok again")


def test_a_detector_cut_off_from_every_host_suspects_itself_the_others_still_detect(
        world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    a, b, c = fleet.start(settings, "a"), fleet.start(settings, "b"), fleet.start(settings, "c")
    settle(fleet)
    world.side.block_source(SOURCES["c"])
    wait_until(lambda: c.storm, 5, what="c suspects itself")
    settle(fleet, 10)
    assert all(state(world, h)["state"] == "ok" for h in range(HOSTS))
    assert not a.storm and not b.storm and c.suspects == set()
    world.side.fail(CUT_OFF_PSU, "psu")  # a real failure meanwhile: a and b are still a quorum
    wait_until(lambda: state(world, CUT_OFF_PSU)["state"] == "dead", 10, what="dead")
    assert [i.source for i in host_incidents(world, CUT_OFF_PSU)] in (["detector:a"], ["detector:b"])
    assert_safe(world, {CUT_OFF_PSU})
    world.side.block_source(SOURCES["c"], blocked=False)
    wait_until(lambda: not c.storm, 5, what="c trusts itself again")


def test_two_detectors_disagreeing_is_no_suspicion(world: World, fleet: Fleet, redis_url: str) -> None:
    settings = detect_settings(world.lab, redis_url)
    a, b = fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet)
    world.side.block_source(SOURCES["a"], hids=[DISAGREE])  # only a loses this one host
    wait_until(lambda: a.misses.counts.get(DISAGREE, 0) >= 3, 5, what="a votes")
    settle(fleet, 10)
    assert a.misses.counts[DISAGREE] >= 10 and b.misses.counts[DISAGREE] == 0 and not a.storm
    assert state(world, DISAGREE)["state"] == "ok" and host_incidents(world, DISAGREE) == []
    assert_safe(world, set())


# --- a detector killed mid-decision (real processes, SIGKILL) ------------------------------------------------------

def _toml(settings: Settings, path: Path) -> Path:
    d = settings.detect
    fencing = ", ".join(json.dumps(a) for a in settings.policy.default.fencing or [])
    lines = [
        "[oned]", f'endpoint = "{settings.oned.endpoint}"',
        "[redis]", f'url = "{settings.redis.url}"',
        "[policy.default]", f"fencing = [{fencing}]", "fence_timeout_s = 8.0", "fence_attempts = 1",
        "[detect]", f"probe_interval_s = {d.probe_interval_s}", f"probe_timeout_s = {d.probe_timeout_s}",
        f"misses_to_suspect = {d.misses_to_suspect}", f"quorum = {d.quorum}", f"alive_ttl_s = {d.alive_ttl_s}",
        f"hosts_refresh_s = {d.hosts_refresh_s}", f"decision_lease_s = {d.decision_lease_s}",
        f'heartbeat_dir = "{d.heartbeat_dir}"', f"heartbeat_stale_s = {d.heartbeat_stale_s}",
        f"heartbeat_margin_s = {d.heartbeat_margin_s}", f"heartbeat_fresh_s = {d.heartbeat_fresh_s}",
        "beacon_port = 0", "metrics_port = 0",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _detector_process(config: Path, name: str, lab: LabCloud) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ONEHA_ONED__SESSION": lab.session, "ONEHA_DETECT__INSTANCE": name,
           "ONEHA_DETECT__PROBE_SOURCE_ADDRESS": SOURCES[name]}
    env.pop("ONEHA_CONFIG", None)
    return subprocess.Popen([sys.executable, "-c", "from oneha.cli import main; main()", "detect", "--config",
                             str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_detector_killed_mid_decision_is_replaced_and_the_host_gets_one_incident(
        world: World, redis_url: str, tmp_path: Path) -> None:
    # The fence command waits 1 s before fence_redfish.sh: the decider is surely mid-decision when it is killed.
    slow_fence = ["bash", "-c", 'sleep 1 && exec bash "$0"', str(FENCE_REDFISH)]
    settings = detect_settings(world.lab, redis_url)
    settings = settings.model_copy(update={"policy": Policy(default=ClusterPolicy(fencing=slow_fence))})
    config = _toml(settings, tmp_path / "oneha.toml")
    procs = {name: _detector_process(config, name, world.lab) for name in SOURCES}
    holder = ""
    try:
        r = world.store.r
        wait_until(lambda: all(r.exists(world.store.keys.detect_view(n)) for n in procs), 20, what="3 detectors up")
        world.side.fail(KILLED, "kernel_hang")
        lease = world.store.keys.detect_decision(KILLED)
        wait_until(lambda: r.get(lease) is not None, 10, interval_s=0.01, what="a detector deciding")
        holder = str(r.get(lease)).split(":")[0]
        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait(5)
        wait_until(lambda: state(world, KILLED)["state"] == "dead", 15, what="another detector finished")
        incidents = host_incidents(world, KILLED)
        assert len(incidents) == 1 and incidents[0].extra["proof"] == "bmc"
        assert incidents[0].source != f"detector:{holder}" and state(world, KILLED)["by"] != holder
        assert world.side.hosts[KILLED].bmc_power == "Off"
        assert_safe(world, {KILLED})
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"detector {name} ignored SIGTERM")
            if name != holder:
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""


def test_a_detector_that_cannot_read_the_heartbeats_never_fences_a_host_with_an_agent(
        world: World, fleet: Fleet, redis_url: str, tmp_path: Path) -> None:
    """The detectors' view of the shared storage breaks (their mount is gone) while a host is cut off from the
    management network but still runs and beats: "no heartbeat seen" must not be read as "stopped"."""
    assert world.side is not None
    view = tmp_path / "heartbeats"
    view.symlink_to(world.side.heartbeat_dir)
    settings = detect_settings(world.lab, redis_url, heartbeat_dir=view)
    fleet.start(settings, "a"), fleet.start(settings, "b")
    settle(fleet, 10)  # every agent seen beating
    view.unlink()
    world.side.fail(PARTITION, "mgmt_partition")
    wait_until(lambda: "cannot read the heartbeat" in state(world, PARTITION).get("detail", ""), 10,
               what="unproven: cannot read")
    settle(fleet, 10)
    assert state(world, PARTITION)["state"] == "suspect" and host_incidents(world, PARTITION) == []
    assert world.side.hosts[PARTITION].bmc_power == "On"
    assert_safe(world, set())
