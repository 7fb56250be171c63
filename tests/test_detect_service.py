"""One detector against a lab front-end without a host side: the beacon accepts the agents' connections, the
threshold is published for them in the heartbeat directory, unresolvable hosts are never probed (so never
suspected), and an operator's OFFLINE/DISABLED host is not probed at all."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from oneha import redisconn
from oneha.detect.service import Detector
from oneha.opennebula import OnedClient, make_server
from oneha.settings import DetectSettings, OnedSettings, RedisSettings, Settings
from oneha.timing_rule import DETECTOR_FILE, read_detector_document
from tests.labkit import call, running_lab


def test_beacon_detector_document_and_targets(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3) as lab:
        with lab.cloud.lock:  # what an operator sets with `onehost update` (the lab has no one.host.update)
            lab.cloud.hosts[0].template["ONEHA_MGMT_ADDRESS"] = "127.0.0.1"
            lab.cloud._touch_host(lab.cloud.hosts[0])
        call(lab.rpc_url, "one.host.status", 2, 2)  # OFFLINE: oned keeps it out; not probed
        settings = Settings(
            oned=OnedSettings(endpoint=lab.rpc_url, session=lab.session), redis=RedisSettings(url=redis_url),
            detect=DetectSettings(probe_interval_s=0.1, probe_timeout_s=0.05, heartbeat_dir=tmp_path,
                                  heartbeat_stale_s=30.0, heartbeat_margin_s=3.0, beacon_port=0,
                                  beacon_bind="127.0.0.1", metrics_port=None, ports=[1]))
        oned = OnedClient(make_server(lab.rpc_url, lab.session))
        detector = Detector(settings, redisconn.client(settings.redis), oned, "t")

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(detector.run(stop))
            while detector.rounds < 3:
                await asyncio.sleep(0.05)
            assert detector.beacon_port
            reader, writer = await asyncio.open_connection("127.0.0.1", detector.beacon_port)
            assert await reader.read() == b""  # accepted, then closed: the whole message
            writer.close()
            stop.set()
            await task

        asyncio.run(scenario())
    assert sorted(detector.targets) == [0]  # host 1: its NAME does not resolve; host 2: OFFLINE
    assert detector.targets[0].address == "127.0.0.1"
    assert detector.misses.counts[0] >= 3  # port 1 refuses: a miss every round (one instance: no quorum)
    assert read_detector_document((tmp_path / DETECTOR_FILE).read_bytes()) == (30.0, 3.0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with socket.socket() as s:  # the beacon is closed with the detector
        assert s.connect_ex(("127.0.0.1", detector.beacon_port or 0)) != 0
