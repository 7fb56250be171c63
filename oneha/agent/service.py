"""`oneha agent`: the start-up check and the loop, around the pure core (core.py).

Start-up, in this order, and nothing is opened before all of it passed (exit 2 with one line otherwise): the
settings, the timing rule on the agent's side (AgentTiming.check), the detectors' published threshold
(`<heartbeat_dir>/detector.json`, check_pair; an absent or unreadable one is logged: the rule is then unchecked
here, and the detectors still check each heartbeat's deadline), the watchdog device (softdog loaded if absent).

Each beat: write the heartbeat (bounded), probe the detectors (bounded), ask the core, arm or pet. A clean stop
(SIGTERM) writes a last heartbeat saying "stopped" and only then disarms the watchdog (magic close); if that write
fails the watchdog stays armed and the host resets, because the heartbeat on the storage still promises it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from oneha.agent.core import AgentCore, Decision
from oneha.agent.heartbeat import HeartbeatWriter, read_bounded
from oneha.agent.visibility import any_accepts
from oneha.agent.watchdog import DeviceWatchdog, NoWatchdog, WatchdogError, ensure_device
from oneha.settings import AgentSettings, parse_endpoint
from oneha.timing_rule import (
    DETECTOR_FILE,
    MAX_HEARTBEAT_BYTES,
    AgentTiming,
    TimingError,
    check_pair,
    read_detector_document,
)

log = logging.getLogger("oneha.agent")
WRITE_SHARE, PROBE_SHARE = 0.5, 0.25  # of a beat: a beat's checks end within 3/4 of it, so it keeps its pace
START_READ_S = 5.0  # detector.json at start: a hung storage must not hang the start for ever


class StartRefused(Exception):
    """Settings that must not run: exit 2, one line."""


def timing_of(settings: AgentSettings) -> AgentTiming:
    return AgentTiming(settings.beat_interval_s, settings.loss_timeout_s, settings.watchdog_timeout_s)


def check_start(settings: AgentSettings) -> tuple[AgentTiming, Path, str]:
    """The start-up check, opening nothing: (timing, heartbeat directory, what it says about the detectors' rule)."""
    if settings.heartbeat_dir is None:
        raise StartRefused("agent.heartbeat_dir is not set: give the heartbeat directory on the shared storage")
    if settings.isolation == "fence" and not settings.detectors:
        raise StartRefused('agent.detectors is empty: with isolation = "fence" the agent could never arm '
                           "(list the detectors' beacon endpoints, or use isolation = \"storage-only\")")
    timing = timing_of(settings)
    try:
        timing.check()
    except TimingError as exc:
        raise StartRefused(str(exc)) from None
    return timing, settings.heartbeat_dir, _check_detectors(timing, settings.heartbeat_dir)


def _check_detectors(timing: AgentTiming, heartbeat_dir: Path) -> str:
    path = heartbeat_dir / DETECTOR_FILE
    try:
        raw = read_bounded(path, START_READ_S, MAX_HEARTBEAT_BYTES)
        if raw is None:
            return (f"{path} is absent: the timing rule is unchecked here (the detectors check each heartbeat's "
                    "published deadline anyway)")
        stale_s, margin_s = read_detector_document(raw)
    except (OSError, ValueError) as exc:
        return f"cannot use {path} ({exc}): the timing rule is unchecked here (the detectors check it anyway)"
    try:
        check_pair(timing, stale_s, margin_s)
    except TimingError as exc:
        raise StartRefused(f"{exc} (detectors' threshold from {path})") from None
    return (f"timing rule holds: deadline {timing.self_fence_deadline_s:g} s + margin {margin_s:g} s <= the "
            f"detectors' heartbeat_stale_s {stale_s:g} s")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"unknown-{time.time_ns()}"


@dataclass
class World:
    """What the loop touches; tests replace any of it."""

    writer: HeartbeatWriter
    probe: Callable[[], bool]
    watchdog: DeviceWatchdog | NoWatchdog
    clock: Callable[[], float] = time.monotonic


class Agent:
    def __init__(self, core: AgentCore, world: World) -> None:
        self.core, self.world = core, world
        beat = core.timing.beat_interval_s
        self.write_timeout_s, self.probe_timeout_s = beat * WRITE_SHARE, beat * PROBE_SHARE
        self._said: tuple[bool, bool, tuple[str, ...]] | None = None

    def beat_once(self) -> Decision:
        clock, core = self.world.clock, self.core
        started = clock()
        self.world.writer.write(core.next_heartbeat().encode(), started, self.write_timeout_s)
        last = self.world.writer.last_success()
        if last is not None:
            core.wrote(last)
        probed = clock()
        if self.world.probe():
            core.saw_detector(probed)
        now = clock()
        decision = core.beat(now)
        self._say(decision, now)
        if decision.arm:
            effective = self.world.watchdog.arm()  # WatchdogError ends the agent (exit 2)
            core.armed_now()
            log.info("watchdog %s armed, timeout %s s: self-fence deadline %g s", getattr(
                self.world.watchdog, "device", "?"), effective, core.timing.self_fence_deadline_s)
        if decision.pet and core.armed:
            try:
                self.world.watchdog.pet()
            except OSError as exc:  # the watchdog then fires: the safe side
                log.error("cannot pet the watchdog: %s", exc.strerror)
        return decision

    def _say(self, decision: Decision, now: float) -> None:
        """Log the decision when its kind changes (not every beat)."""
        key = (decision.pet, self.core.armed, tuple(self.core.lost(now)))
        if key != self._said:
            self._said = key
            level = logging.ERROR if self.core.armed and not decision.pet else logging.INFO
            error = self.world.writer.last_error
            log.log(level, "%s%s", decision.reason, f" (last write: {error})" if error and "storage" in key[2] else "")

    def run(self, stop: threading.Event) -> None:
        beat = self.core.timing.beat_interval_s
        due = self.world.clock()
        while not stop.is_set():
            self.beat_once()
            due = max(due + beat, self.world.clock())  # late: start the next beat now, never in a burst
            stop.wait(max(0.0, due - self.world.clock()))

    def shutdown(self) -> bool:
        """A clean stop: the "stopped" heartbeat first, the magic close only once it is written."""
        started = self.world.clock()
        self.world.writer.wait(self.write_timeout_s)  # a write still running finishes first (or not: then busy)
        if self.world.writer.write(self.core.stop().encode(), started, self.core.timing.loss_timeout_s):
            self.world.watchdog.disarm()
            log.info("stopped: final heartbeat written (it promises nothing), watchdog disarmed")
            return True
        self.world.watchdog.abandon()
        if self.core.armed:
            log.error("stopped, but the final heartbeat could not be written (%s): the heartbeat on the storage "
                      "still promises a self-fence, so the watchdog stays armed and will reset this host",
                      self.world.writer.last_error)
        return False


def build(settings: AgentSettings) -> Agent:
    """The start-up check, then the agent with the real world (raises StartRefused)."""
    timing, heartbeat_dir, rule = check_start(settings)
    log.info("%s", rule)
    watchdog: DeviceWatchdog | NoWatchdog
    if settings.watchdog == "device":
        try:
            note = ensure_device(settings.watchdog_device, settings.watchdog_timeout_s)
        except WatchdogError as exc:
            raise StartRefused(str(exc)) from None
        if note:
            log.warning("%s", note)
        watchdog = DeviceWatchdog(settings.watchdog_device, settings.watchdog_timeout_s)
    else:
        log.warning('watchdog = "none": this host\'s heartbeats promise nothing; detectors can prove its death '
                    "only through its BMC")
        watchdog = NoWatchdog()
    endpoints = [parse_endpoint(text) for text in settings.detectors]
    core = AgentCore(settings.name(), boot_id(), timing, settings.isolation, settings.watchdog == "device",
                     first_seq=time.time_ns() // 1_000_000)  # a restarted agent never repeats a recent seq
    probe_s = timing.beat_interval_s * PROBE_SHARE
    world = World(HeartbeatWriter(heartbeat_dir / settings.name()), lambda: any_accepts(endpoints, probe_s),
                  watchdog)
    return Agent(core, world)


def serve(settings: AgentSettings) -> int:
    """Run until SIGTERM/SIGINT; the exit status (0 clean, 1 watchdog left armed, 2 refused)."""
    try:
        agent = build(settings)
    except StartRefused as exc:
        log.error("refusing to start: %s", exc)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("agent for host %s: heartbeat %s every %g s, isolation %s, detectors %s", settings.name(),
             agent.world.writer.path, settings.beat_interval_s, settings.isolation, ", ".join(settings.detectors))
    try:
        agent.run(stop)
    except WatchdogError as exc:
        log.error("refusing to run: %s", exc)
        agent.shutdown()
        return 2
    return 0 if agent.shutdown() else 1
