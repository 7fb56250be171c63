"""RabbitMQ as the broker (incidents, locks and due times stay in Redis): a host failure is recovered the same way.

Runs where a RabbitMQ answers on 127.0.0.1:5672 (guest/guest, or ONEHA_TEST_AMQP_URL); skipped elsewhere, since
the suite must not depend on one being installed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.workerkit import worker_stack

AMQP_URL = os.environ.get("ONEHA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return "ONEHA_TEST_AMQP_URL" in os.environ


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not rabbitmq_answers(), reason="no RabbitMQ on 127.0.0.1:5672")]


def test_host_failure_recovered_through_rabbitmq(tmp_path: Path, redis_url: str) -> None:
    with running_lab(hosts=3, monitoring_interval_s=0.5, step_delay_s=0.05) as lab:
        vms = [call(lab.rpc_url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"}) for _ in range(4)]
        call(lab.rpc_url, "lab.host.kill", 0)
        wait_until(lambda: "<STATE>3</STATE>" in call(lab.rpc_url, "one.host.info", 0), 10, what="host 0 ERROR")
        with worker_stack(tmp_path, redis_url, lab.rpc_url, workers=1, broker_url=AMQP_URL,
                          policy={"host_action": "recreate"}) as stack:
            incident = stack.wait_closed(stack.report_host(0))
        assert incident.status.value == "recovered", incident.detail
        assert sorted(stack.store.vm_records(incident.id)) == sorted(vms)
        oracle = call(lab.rpc_url, "lab.oracle")
        wait_until(lambda: all(0 not in call(lab.rpc_url, "lab.oracle")["running"].get(str(v), [0]) for v in vms),
                   20, what="the VMs running elsewhere")
        assert oracle["duplicates"] == []
