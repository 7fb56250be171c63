"""The hosts to probe, learnt from oned (`one.hostpool.info`), with the address each is probed on (contract point 1)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from oneha.opennebula import HOST_OPERATOR_STATES, HostView, OnedClient

log = logging.getLogger("oneha.detect.targets")

ADDRESS_ATTRIBUTE = "ONEHA_MGMT_ADDRESS"  # host template attribute the operator sets; else the host's NAME


@dataclass(frozen=True)
class Target:
    host: HostView
    address: str  # resolved once per refresh: a probe round must not wait for name resolution

    @property
    def id(self) -> int:
        return self.host.id

    @property
    def name(self) -> str:
        return self.host.name


def resolve(name: str) -> str | None:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


def learn(oned: OnedClient) -> tuple[dict[int, Target], list[str]]:
    """The hosts oned still considers (an operator's OFFLINE/DISABLED host is not probed: oned already keeps it out
    of placement and never declares it ERROR). Second value: hosts that could not be resolved (never probed, so
    never suspected: a DNS fault must not look like a dead host)."""
    targets: dict[int, Target] = {}
    unresolved: list[str] = []
    for host in oned.host_pool():
        if host.state in HOST_OPERATOR_STATES:
            continue
        name = host.template.get(ADDRESS_ATTRIBUTE, "").strip() or host.name
        address = resolve(name)
        if address is None:
            unresolved.append(f"{host.id}:{name}")
            continue
        targets[host.id] = Target(host, address)
    return targets, unresolved
