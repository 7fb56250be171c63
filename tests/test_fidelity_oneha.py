"""oneha against the parts of oned's behaviour the lab used to hide (issue 9): short pool bodies without HA,
POWEROFF instead of UNKNOWN for a vanished domain, accepted calls that change nothing."""

from __future__ import annotations

from oneha.incidents import Kind
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import incidents, settings
from tests.test_subscriber_lab import services


def test_reconciler_honours_ha_no_although_pool_bodies_are_short(redis_url: str) -> None:
    """The full pass reads the VM pool (short bodies: no USER_TEMPLATE/HA); an opted-out failing VM opens nothing."""
    with running_lab(hosts=2) as lab:
        url = lab.rpc_url
        opted = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING", "HA": "NO"})
        plain = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING"})
        call(url, "lab.faults", {"event_drop_rate": 1.0})
        for vid in (opted, plain):
            call(url, "lab.vm.fail", vid, "BOOT_FAILURE")
        s = settings(redis_url, [lab.events_url], rpc_url=url, session=lab.session)
        with services(1, s) as (svc,):
            wait_until(lambda: svc.reconciler.passes >= 2, 10, what="two reconcile passes")
            found = {(i.kind, i.resource_id) for i in incidents(redis_url)}
        assert (Kind.VM_FAILURE, plain) in found
        assert (Kind.VM_FAILURE, opted) not in found
