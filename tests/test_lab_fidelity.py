"""The lab does what oned does where oneha could be fooled (issue 9), each case read in OpenNebula's source."""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xmlrpc.client
from typing import Any

from lab.sim import LabCloud
from oneha.waiting import wait_until
from tests.labkit import call, running_lab

LAB = {"monitoring_interval_s": 0.3, "step_delay_s": 0.03}


def body(lab: LabCloud, method: str, *args: Any) -> ET.Element:
    reply = getattr(xmlrpc.client.ServerProxy(lab.rpc_url), method)(lab.session, *args)
    assert reply[0] is True, reply
    return ET.fromstring(reply[1])


def test_short_bodies_drop_the_user_template_extended_and_info_keep_it() -> None:
    """`VirtualMachineTemplate::to_xml_short`: only LABELS/ERROR/SCHED_MESSAGE (not empty), SCHED_* and
    USER_PRIORITY survive in vmpool.info and infoset(ids, false); infoextended / infoset(ids, true) keep all but
    only the last history record (`to_xml_extended(xml, 1, …)`); vm.info has every record."""
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vid = call(url, "lab.vm.create", {"HOST": 0, "STATE": "RUNNING", "HA": "NO", "HA_PRIORITY": 7,
                                          "USER_TEMPLATE": {"LABELS": "web", "ERROR": "", "USER_PRIORITY": "3",
                                                            "SCHED_REQUIREMENTS": "ID!=2"}})
        bare = call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"})
        call(url, "one.vm.migrate", vid, 1, False)  # a second history record
        wait_until(lambda: int(body(lab, "one.vm.info", vid).findtext("LCM_STATE") or 0) == 3, 5, what="RUNNING")
        shorts = [body(lab, "one.vmpool.info", -2, vid, vid, -1).find("VM"),
                  body(lab, "one.vmpool.infoset", str(vid), False).find("VM")]
        for short in shorts:
            assert short is not None
            user = {e.tag: e.text or "" for e in short.find("USER_TEMPLATE") or []}
            assert user == {"LABELS": "web", "SCHED_REQUIREMENTS": "ID!=2", "USER_PRIORITY": "3"}
            assert [e.tag for e in short.find("TEMPLATE") or []] == ["CPU", "MEMORY", "VCPU"]
            assert len(short.findall("HISTORY_RECORDS/HISTORY")) == 1
        bare_short = body(lab, "one.vmpool.infoset", str(bare), False).find("VM/USER_TEMPLATE")
        assert bare_short is not None and len(bare_short) == 0
        for ext in (body(lab, "one.vmpool.infoset", str(vid), True).find("VM"),
                    next(v for v in body(lab, "one.vmpool.infoextended", -2, -1, -1, -1)
                         if v.findtext("ID") == str(vid))):
            assert ext is not None
            assert ext.findtext("USER_TEMPLATE/HA") == "NO" and ext.findtext("USER_TEMPLATE/HA_PRIORITY") == "7"
            assert [h.findtext("SEQ") for h in ext.findall("HISTORY_RECORDS/HISTORY")] == ["1"]
        info = body(lab, "one.vm.info", vid)
        assert info.findtext("USER_TEMPLATE/HA") == "NO"
        assert [h.findtext("SEQ") for h in info.findall("HISTORY_RECORDS/HISTORY")] == ["0", "1"]
