"""Reading QEMU's user-mode network forwards back (HMP ``info usernet``).

A forward asked for with host port 0 lets the kernel pick a free port, which
avoids the race of choosing one first; this is how the real port is learned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["UsernetForward", "parse_usernet"]


@dataclass(frozen=True)
class UsernetForward:
    """One host forward of a user-mode network, as QEMU actually bound it."""

    netdev: str
    protocol: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int


_HUB_RE = re.compile(r"^Hub\s+-?\d+\s+\((?P<netdev>[^)]*)\):")
_FWD_RE = re.compile(
    r"^\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+\d+\s+(?P<haddr>\S+)\s+(?P<hport>\d+)"
    r"\s+(?P<gaddr>\S+)\s+(?P<gport>\d+)"
)


def parse_usernet(text: str) -> list[UsernetForward]:
    """The host forwards in the output of HMP ``info usernet``.

    A forward asked for with host port 0 shows here with the port the
    kernel picked, which is the only race-free way to get a free port.
    """
    forwards = []
    netdev = ""
    for line in text.splitlines():
        hub = _HUB_RE.match(line)
        if hub:
            netdev = hub.group("netdev")
            continue
        m = _FWD_RE.match(line)
        if m:
            forwards.append(UsernetForward(netdev, m.group("proto").lower(), m.group("haddr"),
                                           int(m.group("hport")), m.group("gaddr"),
                                           int(m.group("gport"))))
    return forwards
