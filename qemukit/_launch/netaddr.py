"""Names and numbers of the private networks: pure functions, no I/O (argv uses them).

See :mod:`qemukit._launch.netswitch` for the switch that carries the frames.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpecError
from ..spec import NETWORK_RE

__all__ = [
    "GATEWAY_DHCP_INDEX", "GATEWAY_DNS_INDEX", "GATEWAY_INDEX", "MAX_MEMBERS", "NetworkMember",
    "Networks", "check_network_name", "gateway_macs", "network_address", "network_dir",
    "network_mac", "network_nic_id", "network_subnet",
]

#: The highest index a VM gets on a network (addresses .1 to .223 of its /24): the top of
#: the /24 belongs to the host's gateway (see :mod:`qemukit._launch.netgate`), whether or
#: not one runs, so an address never changes hands when the host is asked onto a network.
MAX_MEMBERS = 223
#: The host's address on a network (where forwarded connections come from).
GATEWAY_INDEX = 254
#: The gateway's DNS address (QEMU's user network has one; refused to VMs under ``restrict``).
GATEWAY_DNS_INDEX = 253
#: The first of the 16 addresses the gateway's DHCP server hands out (.224 to .239): a
#: guest's DHCP client that asks before qemukit configures its NIC gets one of these,
#: never a member's address.
GATEWAY_DHCP_INDEX = 224


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def check_network_name(name: object, field_name: str = "networks") -> str:
    """``name`` if it is a valid network name, else :class:`SpecError` naming it."""
    if not isinstance(name, str) or not NETWORK_RE.fullmatch(name):
        raise SpecError(field_name, name, f"a network name must match {NETWORK_RE.pattern} "
                        "(lower-case letters, digits and '-'; no ',', '/' or '.')")
    return name


def network_mac(network: str, vm_name: str) -> str:
    """The MAC of ``vm_name``'s NIC on ``network``: stable, locally administered, unicast."""
    raw = _digest("qemukit-mac", network, vm_name)[:5]
    return "02:" + ":".join(f"{b:02x}" for b in raw)


def network_subnet(network: str) -> ipaddress.IPv4Network:
    """The /24 of ``network``: 10.64.0.0 to 10.191.255.0, from its name (never QEMU's 10.0.2)."""
    raw = _digest("qemukit-subnet", network)
    return ipaddress.IPv4Network(f"10.{64 + raw[0] % 128}.{raw[1]}.0/24")


def network_address(network: str, index: int) -> str:
    """The address of index ``index`` (1-254) of ``network`` (members: 1 to :data:`MAX_MEMBERS`)."""
    return str(network_subnet(network).network_address + index)


def gateway_macs(network: str) -> frozenset[str]:
    """The MACs the host's gateway on ``network`` sends from.

    QEMU's user network (libslirp) answers as ``52:55`` plus the four bytes of the
    address it answers for: its host address, or its DNS address.
    """
    subnet = network_subnet(network)
    macs = set()
    for index in (GATEWAY_INDEX, GATEWAY_DNS_INDEX):
        raw = (subnet.network_address + index).packed
        macs.add("52:55:" + ":".join(f"{b:02x}" for b in raw))
    return frozenset(macs)


def network_nic_id(network: str) -> str:
    """The QEMU device id of a VM's NIC on ``network`` (what ``vm.block()`` takes)."""
    return f"net-{network}"


def network_dir(root: Path, network: str) -> Path:
    """Where the switch of ``network`` keeps its socket (``root`` is the state directory)."""
    return Path(root) / ".net" / network


@dataclass(frozen=True)
class NetworkMember:
    """A VM's place on a network: its index, MAC and address, and who was there when it joined."""

    network: str
    name: str
    index: int
    mac: str
    #: Every member at the time of joining (this VM too): VM name -> index.
    members: Mapping[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """This VM's IPv4 address on the network."""
        return network_address(self.network, self.index)

    @property
    def prefix(self) -> int:
        """The network's prefix length (24)."""
        return network_subnet(self.network).prefixlen

    @property
    def nic_id(self) -> str:
        """The NIC's device id (``net-<network>``)."""
        return network_nic_id(self.network)

    def hosts(self) -> dict[str, str]:
        """Member name -> address, as written to the guest's ``/etc/hosts``."""
        return {name: network_address(self.network, i) for name, i in sorted(self.members.items())}


class Networks(dict[str, NetworkMember]):
    """A VM's networks by name; asking for one it is not on says which it is on."""

    def __init__(self, vm_name: str = "") -> None:
        super().__init__()
        self.vm_name = vm_name
        #: Network -> the name the VM goes by there (in its members' /etc/hosts), where it
        #: is not the VM's own name: the pytest plugin's ``qemu_network`` under xdist names a
        #: VM ``gw0-server`` but the test (and the other guests) call it ``server``.
        self.aliases: dict[str, str] = {}

    def __missing__(self, key: str) -> NetworkMember:
        raise KeyError(f"VM {self.vm_name!r} is not on network {key!r}; its networks: "
                       f"{', '.join(self) or 'none'}")
