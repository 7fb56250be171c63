"""1,000 hosts / 20,000 VMs: built and served. Timings and memory are printed (run with -s), not asserted."""

from __future__ import annotations

import resource
import time
import xmlrpc.client

import pyone

from oneha.lab.sim import LabCloud
from tests.labkit import running_lab


def test_thousand_hosts_twenty_thousand_vms() -> None:
    started = time.perf_counter()
    with running_lab(hosts=1000, vms=20000, clusters=4) as lab:
        built_s = time.perf_counter() - started
        one = pyone.OneServer(lab.rpc_url, session=lab.session)
        proxy = xmlrpc.client.ServerProxy(lab.rpc_url)

        timings = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            body = proxy.one.hostpool.info(lab.session)[1]
            timings[f"hostpool raw {label}"] = time.perf_counter() - t
        t = time.perf_counter()
        pool = one.hostpool.info()
        timings["hostpool pyone"] = time.perf_counter() - t
        assert len(pool.HOST) == 1000
        assert sum(len(h.VMS.ID) for h in pool.HOST) == 20000
        assert body.count("<HOST>") == 1000

        t = time.perf_counter()
        vms = proxy.one.vmpool.info(lab.session, -2, -1, -1, -1)[1]
        timings["vmpool raw"] = time.perf_counter() - t
        assert vms.count("<VM>") == 20000
        t = time.perf_counter()
        assert len(one.vmpool.infoset(",".join(str(i) for i in range(0, 20000, 40)), False).VM) == 500
        timings["infoset 500 pyone"] = time.perf_counter() - t

        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nscale: built in {built_s:.2f}s; max RSS of the test process {rss_mb:.0f} MB; "
              + "; ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
        assert isinstance(lab, LabCloud)
