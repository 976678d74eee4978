"""The host on a private network, when asked: a gateway QEMU run by the network's switch.

A network is closed to the host by default. Asking for a port into one of its VMs
(:func:`qemukit.network_forward`, ``qemukit net forward``) makes the network's switch
start its gateway, once: a QEMU with no machine (``-machine none -nodefaults``)
whose only work is a user-mode network (libslirp) joined to the switch through
QEMU's internal hub::

    -netdev stream,id=switch,addr.type=fd,...      the switch's end of a socketpair
    -netdev user,id=host,restrict=on,net=<the network's /24>,host=.254,dns=.253,dhcpstart=.224
    -netdev hubport,hubid=0,netdev=switch  -netdev hubport,hubid=0,netdev=host

``restrict=on`` keeps every connection a VM opens inside the network: the internet
and the host's loopback stay out of reach through the gateway. Each forward is a
``hostfwd_add host tcp:127.0.0.1:0-<VM address>:<port>`` (HMP over the gateway's
QMP, a socketpair): the kernel picks a free port on 127.0.0.1 and the gateway
reports it in ``info usernet``. Connections come into the VM from the host's
address on the network (.254).

The switch owns the gateway: it starts it as its child (killed by the kernel if the
switch dies), and stops it when the network's last VM has gone or the switch is
stopped, so no process outlives the network. The gateway's frames pass the same
checks as a VM's: it may send from its own two MACs only (libslirp's ``52:55`` plus
the address it answers for, see :func:`~qemukit._launch.netaddr.gateway_macs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import socket
import subprocess
from pathlib import Path

from .argv import SANDBOX_OPTS
from .netaddr import (
    GATEWAY_DHCP_INDEX,
    GATEWAY_DNS_INDEX,
    GATEWAY_INDEX,
    gateway_macs,
    network_address,
    network_subnet,
)
from .process import die_with_parent

__all__ = ["PID_NAME", "Gateway", "GatewayError", "check_qemu_path", "gateway_argv"]

#: The gateway writes its pid here, in the network's directory (which names the state
#: directory on its command line, so a leak check that looks for QEMUs under it finds it).
PID_NAME = "gateway.pid"
#: How long the gateway may take to answer on its monitor (start, each command).
MONITOR_TIMEOUT = 30.0
#: How long a gateway has to exit on SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
#: The longest monitor line read (QEMU's own answers; ``info usernet`` grows per forward).
_LINE_MAX = 1024 * 1024
_NETDEV = "host"
_FORWARD_RE = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+(\d+\.\d+\.\d+\.\d+)\s+(\d+)\s")


class GatewayError(Exception):
    """The gateway did not start or refused a forward (the switch answers it as an error)."""


def check_qemu_path(qemu: object) -> str:
    """``qemu`` if it names an executable ``qemu-system-*`` by absolute path, else GatewayError."""
    if (not isinstance(qemu, str) or not os.path.isabs(qemu) or len(qemu) > 4096
            or not os.path.basename(qemu).startswith("qemu-system-")
            or not os.path.isfile(qemu) or not os.access(qemu, os.X_OK)):
        raise GatewayError(f"bad QEMU for the gateway: {qemu!r} (an absolute path to a "
                           "qemu-system-* binary)")
    return qemu


def gateway_argv(qemu: str, network: str, pidfile: Path, link_fd: int, monitor_fd: int) -> list[str]:
    """The gateway's command line: no machine, one restricted user network on the hub."""
    subnet = network_subnet(network)
    user = (f"user,id={_NETDEV},restrict=on,net={subnet},"
            f"host={network_address(network, GATEWAY_INDEX)},"
            f"dns={network_address(network, GATEWAY_DNS_INDEX)},"
            f"dhcpstart={network_address(network, GATEWAY_DHCP_INDEX)}")
    return [
        qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", SANDBOX_OPTS, "-pidfile", str(pidfile),
        "-chardev", f"socket,id=qmp,fd={monitor_fd}", "-mon", "chardev=qmp,mode=control",
        "-netdev", f"stream,id=switch,addr.type=fd,addr.str={link_fd}",
        "-netdev", user,
        "-netdev", "hubport,id=hub-switch,hubid=0,netdev=switch",
        "-netdev", f"hubport,id=hub-host,hubid=0,netdev={_NETDEV}",
    ]


def _forwards(listing: str) -> set[tuple[int, str, int]]:
    """(host port, VM address, VM port) of each TCP forward in ``info usernet``."""
    return {(int(m.group(1)), m.group(2), int(m.group(3))) for m in _FORWARD_RE.finditer(listing)}


class Gateway:
    """One network's gateway QEMU, from the switch's side: start, forward, stop."""

    def __init__(self, network: str, directory: Path, qemu: str) -> None:
        self.network, self.directory, self.qemu = network, directory, qemu
        self.macs = frozenset(bytes(int(p, 16) for p in mac.split(":"))
                              for mac in gateway_macs(network))
        self.proc: subprocess.Popen[bytes] | None = None
        self._monitor: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    def alive(self) -> bool:
        """True while its QEMU runs."""
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Start QEMU and greet its monitor; the switch's end of the link, as streams."""
        link, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        monitor, their_monitor = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = gateway_argv(self.qemu, self.network, self.directory / "gateway.pid",
                                theirs.fileno(), their_monitor.fileno())
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno(), their_monitor.fileno()],
                # The switch's log is its stdout and stderr: QEMU's complaints land there.
                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        except OSError as exc:
            link.close()
            monitor.close()
            raise GatewayError(f"the gateway QEMU did not start: {exc}") from exc
        finally:
            theirs.close()
            their_monitor.close()
        try:
            self._monitor = await asyncio.open_unix_connection(sock=monitor, limit=_LINE_MAX)
            await self._reply()  # the greeting
            await self._command("qmp_capabilities")
            return await asyncio.open_unix_connection(sock=link, limit=_LINE_MAX)
        except BaseException:
            link.close()
            await self.stop()
            raise

    async def _reply(self) -> dict[str, object]:
        """The next non-event message on the monitor, within :data:`MONITOR_TIMEOUT`."""
        assert self._monitor is not None
        reader = self._monitor[0]
        async with asyncio.timeout(MONITOR_TIMEOUT):
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    raise GatewayError(f"the gateway's monitor closed or misbehaved "
                                       f"(exit {self.proc.poll() if self.proc else None})") from exc
                message = json.loads(line)
                if isinstance(message, dict) and "event" not in message:
                    return message

    async def _command(self, command: str, arguments: dict[str, object] | None = None) -> object:
        assert self._monitor is not None
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._monitor[1].write(json.dumps(request).encode() + b"\n")
        await self._monitor[1].drain()
        reply = await self._reply()
        if "error" in reply:
            raise GatewayError(f"the gateway refused {command}: {reply['error']}")
        return reply.get("return")

    async def _hmp(self, line: str) -> str:
        return str(await self._command("human-monitor-command", {"command-line": line}))

    async def forward(self, address: str, port: int) -> int:
        """Forward a free port of 127.0.0.1 to ``address:port`` on the network; that port."""
        async with self._lock:
            before = _forwards(await self._hmp("info usernet"))
            said = await self._hmp(f"hostfwd_add {_NETDEV} tcp:127.0.0.1:0-{address}:{port}")
            if said.strip():
                raise GatewayError(f"the gateway refused the forward: {said.strip()[:300]}")
            new = [host for host, addr, guest in _forwards(await self._hmp("info usernet")) - before
                   if addr == address and guest == port]
            if len(new) != 1:
                raise GatewayError(f"the gateway did not report the new forward to {address}:{port}")
            return new[0]

    async def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`) and reap it."""
        if self._monitor is not None:
            self._monitor[1].close()
            self._monitor = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / PID_NAME).unlink()
