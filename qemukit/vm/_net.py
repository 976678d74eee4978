"""Private networks in a VM's life: join at start, the guest's address, warm clones.

A cold start joins each of ``spec.networks`` before QEMU starts (QEMU inherits
the switch connection, see :mod:`qemukit._launch.netswitch`); once the guest is
ready, qemukit writes the NIC's address and the members' names into it. A warm
clone is restored from a state without these NICs (one saved state serves every
network), so its NICs are hot-plugged right after the restore, then configured.

Names: a guest's ``/etc/hosts`` gets every member known when it is configured;
VMs of this process on the same event loop (every :class:`~qemukit.VM` of the
sync API shares one) also get each later member's line as it comes. Members that
another process started (``qemukit run --detach`` twice) are found in the
registry by name and told through their agents (:func:`_tell_other_processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import socket
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from .._launch.netaddr import (
    NetworkMember,
    Networks,
    network_address,
    network_mac,
    network_nic_id,
    network_subnet,
)
from .._launch.netswitch import join, members
from ..errors import SpecError, StateError, WaitTimeout

if TYPE_CHECKING:
    from ._core import AsyncVM

_log = logging.getLogger("qemukit.network")

#: How long a hot-plugged NIC of a warm clone may take to show up in the guest.
NIC_APPEAR_TIMEOUT = 30.0
#: The comment marking the lines qemukit wrote into a guest's /etc/hosts.
HOSTS_MARK = "qemukit-net"

#: Per (state directory, network): the VMs of this process on it.
_peers: dict[tuple[str, str], weakref.WeakSet[AsyncVM]] = {}
#: The VMs whose guest has its addresses (or is being given them), with their event loop.
_configured: weakref.WeakKeyDictionary[AsyncVM, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary())


def needs_configuring(vm: AsyncVM) -> bool:
    """True if ``vm`` joined networks whose addresses are not written into its guest yet."""
    return bool(vm.networks) and vm not in _configured


def check_subnets(names: tuple[str, ...]) -> None:
    """Two networks of one VM must not share a /24 (their names' digests could)."""
    seen: dict[str, str] = {}
    for name in names:
        subnet = str(network_subnet(name))
        if subnet in seen:
            raise SpecError("networks", name, f"gets the same subnet ({subnet}) as network "
                            f"{seen[subnet]!r}; rename one of them")
        seen[subnet] = name


async def join_networks(vm: AsyncVM, root: Path, names: tuple[str, ...]) -> list[socket.socket]:
    """Join ``vm`` (its name claimed) to ``names``; the switch connections to hand QEMU."""
    joined: list[socket.socket] = []
    if isinstance(vm.networks, Networks):
        vm.networks.vm_name = vm.name  # generated at the start when the spec had none
    try:
        for name in names:
            # The MAC comes from the VM's own name (as on its command line), the name it
            # goes by on the network may be an alias.
            sock, member = await asyncio.to_thread(
                join, root, name, _name_on(vm, name), network_mac(name, vm.name))
            joined.append(sock)
            vm.networks[name] = member
            _peers.setdefault((str(root), name), weakref.WeakSet()).add(vm)
    except BaseException:
        for sock in joined:
            sock.close()
        raise
    return joined


def _name_on(vm: AsyncVM, network: str) -> str:
    """The name ``vm`` goes by on ``network``: its alias there, else its own."""
    aliases = getattr(vm.networks, "aliases", {})
    return str(aliases.get(network, vm.name))


def _hosts_script(network: str, hosts: dict[str, str]) -> str:
    """Replace this network's lines for ``hosts`` in /etc/hosts (in place: it may be a mount)."""
    mark = f"# {HOSTS_MARK} {network}"
    drop = " ".join(f"-e {shlex.quote(f' {name} {mark}')}" for name in hosts)
    lines = "".join(f"{addr} {name} {mark}\n" for name, addr in sorted(hosts.items()))
    return (f"{{ grep -v -F {drop} /etc/hosts; printf %s {shlex.quote(lines)}; }} >/etc/hosts.qk"
            " && cat /etc/hosts.qk >/etc/hosts && rm -f /etc/hosts.qk")


def _address_script(member: NetworkMember) -> str:
    """Find the NIC by its MAC, stop any DHCP client on it, give it its address."""
    q = shlex.quote
    return "\n".join([
        f"mac={q(member.mac)}; ifname=",
        'for d in /sys/class/net/*; do [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && '
        'ifname=${d##*/}; done',
        '[ -n "$ifname" ] || { echo "no interface has MAC $mac" >&2; exit 3; }',
        # The tiny init runs udhcpc on every NIC it finds at boot; nobody answers it here.
        'for p in $(pidof udhcpc dhclient 2>/dev/null); do tr "\\0" " " </proc/$p/cmdline | '
        'grep -q -e " $ifname " -e " $ifname\\$" && kill $p; done',
        'ip addr flush dev "$ifname"',
        f'ip addr add {q(f"{member.address}/{member.prefix}")} dev "$ifname"',
        'ip link set "$ifname" up',
    ])


async def _run(vm: AsyncVM, script: str, what: str) -> None:
    result = await vm.exec(["sh", "-c", script], timeout=60)
    if result.exit_status != 0:
        raise StateError(f"VM {vm.name!r}: {what} failed (exit {result.exit_status}): "
                         f"{(result.stderr or result.stdout).decode(errors='replace').strip()[:400]}")


async def configure_guest(vm: AsyncVM) -> None:
    """Write each network's address and members' names into the ready guest."""
    # Before the first exec, which waits for the guest to be ready (and would come here).
    _configured[vm] = asyncio.get_running_loop()
    try:
        await _configure(vm)
    except BaseException:
        _configured.pop(vm, None)
        raise


async def _configure(vm: AsyncVM) -> None:
    root = str(vm.runtime.path.parent) if vm.runtime is not None else ""
    for name, member in vm.networks.items():
        hosts = member.hosts()
        now: dict[str, int] = {}
        if root:
            # Who is there now: members that joined after this VM (another process's, whose
            # start overlapped this one) are not in its welcome.
            try:
                now = await asyncio.to_thread(members, Path(root), name)
            except (StateError, WaitTimeout) as exc:
                _log.info("network %s: listing its members failed: %s", name, exc)
            hosts.update({other: network_address(name, index) for other, index in now.items()})
        peers = [p for p in _peers.get((root, name), ())
                 if p is not vm and name in p.networks and p.qemu_alive()]
        for peer in peers:
            other = peer.networks[name]
            hosts[other.name] = other.address
        await _run(vm, _address_script(member) + "\n" + _hosts_script(name, hosts),
                   f"configuring its NIC on network {name!r}")
        # Tell the members already configured on this loop about the newcomer.
        loop = asyncio.get_running_loop()
        here = {p.networks[name].name for p in peers} | {member.name}
        # Those that joined before it (in its welcome) and are still there: a later one
        # reads this VM's line from the switch when it is configured itself.
        others = sorted((set(member.members) & set(now or member.members)) - here)
        if others and root:
            await _tell_other_processes(Path(root), member, others)
        for peer in peers:
            if _configured.get(peer) is loop and peer.has_agent:
                try:
                    await _run(peer, _hosts_script(name, {member.name: member.address}),
                               f"adding {vm.name!r} to its /etc/hosts")
                except Exception as exc:  # noqa: BLE001 - a stopped peer costs it the name only
                    _log.debug("%s: could not add %s to %s's hosts: %r", name, vm.name, peer.name,
                               exc)


async def plug_after_restore(vm: AsyncVM, root: Path, names: tuple[str, ...]) -> None:
    """A warm clone's NICs: join, hand QEMU the connection, plug, wait for the guest to see it.

    :func:`configure_guest` follows; until then no command's wait for the guest
    (``wait_ready``) may configure a NIC that is not there yet.
    """
    _configured[vm] = asyncio.get_running_loop()
    socks = await join_networks(vm, root, names)
    try:
        for name, sock in zip(names, socks, strict=True):
            dev_id = network_nic_id(name)
            fdname = await vm.monitor.hand_over_fd(sock.fileno(), f"net-{name}")
            # "socket", not "stream": QEMU 7.2's stream backend looks a getfd name up from a
            # worker thread, where there is no monitor, and fails ("connection error").
            await vm.qmp("netdev_add", {"type": "socket", "id": f"{dev_id}-backend",
                                        "fd": fdname})
            device = {"driver": "virtio-net-pci", "id": dev_id, "netdev": f"{dev_id}-backend",
                      "mac": network_mac(name, vm.name), "bus": await _free_port(vm)}
            await vm.qmp("device_add", device)
    finally:
        for sock in socks:
            sock.close()
    await _wait_for_nics(vm, names)
    vm.spec = vm.spec.replace(networks=(*vm.spec.networks, *names))


async def _wait_for_nics(vm: AsyncVM, names: tuple[str, ...]) -> None:
    """Until the guest sees a NIC with each network's MAC, within :data:`NIC_APPEAR_TIMEOUT`."""
    macs = " ".join(vm.networks[n].mac for n in names)
    script = (f"for m in {macs}; do grep -qx \"$m\" /sys/class/net/*/address 2>/dev/null "
              "|| exit 1; done")
    what = (f"the hot-plugged NICs of networks {', '.join(names)} in the guest of warm clone "
            f"{vm.name!r}")
    deadline = time.monotonic() + NIC_APPEAR_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, NIC_APPEAR_TIMEOUT)
        try:
            result = await vm.exec(["sh", "-c", script], timeout=min(left, 30.0))
        except TimeoutError as exc:  # the check itself took the time left
            raise WaitTimeout(what, NIC_APPEAR_TIMEOUT) from exc
        if result.exit_status == 0:
            return
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


async def _free_port(vm: AsyncVM) -> str:
    """The first pcie-root-port (hp0, hp1...) with nothing on it."""
    ports = [f"hp{i}" for i in range(vm.spec.hotplug_ports)]
    empty = set()
    for bus in await vm.qmp("query-pci"):
        for dev in bus.get("devices", ()):
            if dev.get("qdev_id") in ports and not dev.get("pci_bridge", {}).get("devices"):
                empty.add(dev["qdev_id"])
    for port in ports:
        if port in empty:
            return port
    raise StateError(f"VM {vm.name!r}: no free pcie-root-port for its network NIC; start it "
                     "with more hotplug_ports")


#: How long telling one member of another process about a newcomer may take (attach,
#: the agent's command): a member whose QEMU another client holds costs this, no more.
TELL_TIMEOUT = 15.0


async def _tell_other_processes(root: Path, member: NetworkMember, names: list[str]) -> None:
    """Add ``member``'s line to the /etc/hosts of earlier members that other processes run.

    Each is found in the registry by its name (a VM's name is unique in a state
    directory, and the switch lets one name onto a network once), attached (QMP,
    agent), checked to be that member (its NIC's MAC there comes from the network
    and its name) and let go again. What comes back from the
    guest is its exit status only. A member that cannot be reached (no agent, its
    QMP held by another client, gone) keeps knowing the newcomer by address only:
    logged, not raised; the newcomer's own start does not fail for it.
    """
    from ._core import AsyncVM

    script = _hosts_script(member.network, {member.name: member.address})
    for name in names:
        peer = None
        try:
            async with asyncio.timeout(TELL_TIMEOUT):
                peer = await AsyncVM.attach(name, state_root=root, timeout=TELL_TIMEOUT)
                # That VM is the member if its NIC on the network has the MAC of that name
                # there (a warm clone's spec file does not list its hot-plugged networks).
                mac = await peer.qmp("qom-get", {"path": f"/machine/peripheral/{member.nic_id}",
                                                 "property": "mac"})
                if mac != network_mac(member.network, name) or not peer.has_agent:
                    _log.info("network %s: VM %s of the registry is not its member %s",
                              member.network, name, name)
                    continue
                await _run(peer, script, f"adding {member.name!r} to its /etc/hosts")
        except Exception as exc:  # noqa: BLE001 - that member keeps the address only
            _log.info("network %s: could not tell %s (another process's VM) about %s: %s",
                      member.network, name, member.name, exc)
        finally:
            if peer is not None:
                with contextlib.suppress(Exception):
                    await peer.detach()
