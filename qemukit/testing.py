"""Fakes for testing code that drives a VM, without QEMU: a fake target and a fake guest agent.

qemukit's operations on a running VM (:class:`~qemukit.hotplug.AsyncHotplug`,
:class:`~qemukit.snapshot.Snapshots`, :class:`~qemukit.guest.AsyncGuest`)
are written against :class:`~qemukit.target.VMTarget`, the least a running
VM offers them. :class:`FakeVM` is one without a QEMU behind it: it answers
QMP commands from a small model of QEMU's state (run state, PCIe ports,
devices, block nodes, netdevs, memory backends, DIMMs, CPU slots) and sends
the events a guest would cause (``STOP``/``RESUME``, ``DEVICE_DELETED``,
``ACPI_DEVICE_OST``). :class:`FakeAgent` answers guest commands with results
you choose. So a test of your own code, the way httpx's ``MockTransport``
serves a test of an HTTP client::

    from qemukit.hotplug import AsyncHotplug
    from qemukit.testing import FakeVM

    async def test_my_code_plugs_a_nic_and_unplugs_it(tmp_path):
        vm = FakeVM(tmp_path, VMSpec(kernel="/vmlinuz", hotplug_ports=2))
        await my_code(AsyncHotplug(vm))           # what your code does with vm.hotplug
        assert vm.commands("device_add") == [{"driver": "virtio-net-pci", ...}]
        assert vm.peripheral == {"vser0": "virtio-serial-pci"}   # and unplugged again

Every command is recorded in :attr:`FakeVM.log`; :attr:`FakeVM.fail` makes a
command fail as QEMU would; :meth:`FakeVM.on_command` answers a command the
model does not know (or overrides one); :attr:`FakeVM.on_unplug` chooses
what the guest does on ``device_del``. A disk hot-plug still inspects the
image with the host's ``qemu-img`` (the format is never guessed).
The behaviour itself is tested against real QEMU in qemukit's own suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal, TypeVar

from qemu.qmp import EventListener, Message

from . import host
from ._launch.runtime import RuntimeDir
from ._wire.agent import Agent, ExecResult
from .arch import ARCHES
from .errors import QMPCommandError, WaitTimeout
from .guest import AsyncGuest
from .spec import VMSpec

__all__ = ["MUTATING", "FakeAgent", "FakeMonitor", "FakeVM", "Unplug"]

T = TypeVar("T")

#: The QMP commands that change a VM (the rest only ask): :attr:`FakeVM.mutations` lists these.
MUTATING = frozenset({"blockdev-add", "blockdev-del", "netdev_add", "netdev_del", "object-add",
                      "object-del", "device_add", "device_del", "stop", "cont"})

#: What the guest does on ``device_del``: release the device, refuse it
#: (``DEVICE_UNPLUG_GUEST_ERROR``), report it busy over ACPI, or nothing at all.
Unplug = Literal["delete", "guest-error", "ost-busy", "nothing"]


class FakeMonitor:
    """The event side of a QMP connection (``vm.monitor``): listeners and events.

    :meth:`emit` sends an event to every listener, after the reply to the
    command being run, as QEMU does; :attr:`events` keeps what was sent.
    """

    def __init__(self) -> None:
        self.listeners: list[EventListener] = []
        #: Every event sent, in order.
        self.events: list[dict[str, Any]] = []
        #: The names of the file descriptors handed over (``getfd``), in order.
        self.fds: list[str] = []
        self._disconnected: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<FakeMonitor listeners={len(self.listeners)} events={len(self.events)}>"

    @contextlib.contextmanager
    def listen(self, *names: str, match: Any = None) -> Iterator[EventListener]:
        """Listen for the events ``names`` (all events if none) while the block runs."""
        listener = EventListener(names or None, match)
        self.listeners.append(listener)
        try:
            yield listener
        finally:
            self.listeners.remove(listener)

    async def wait_event(self, listener: EventListener, timeout: float | None,
                         what: str) -> dict[str, Any]:
        """The listener's next event; :class:`WaitTimeout` naming ``what`` after ``timeout``."""
        try:
            return dict(await asyncio.wait_for(listener.get(), timeout))
        except TimeoutError:
            raise WaitTimeout(what, timeout or 0) from None

    async def hand_over_fd(self, fd: int, prefix: str, *, timeout: float = 30.0) -> str:
        """Record that ``fd`` was passed; returns its name (QEMU would keep a copy)."""
        name = f"{prefix}-{len(self.fds)}"
        self.fds.append(name)
        return name

    async def wait_disconnected(self) -> None:
        """Return once :meth:`disconnect` was called (the fake QEMU exited)."""
        await self._gone().wait()

    def disconnect(self) -> None:
        """The connection is gone: :meth:`wait_disconnected` returns."""
        self._gone().set()

    def _gone(self) -> asyncio.Event:
        if self._disconnected is None:
            self._disconnected = asyncio.Event()
        return self._disconnected

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send the event ``name`` soon (after the current command's reply)."""
        now = time.time()
        event = {"event": name, "data": dict(data or {}),
                 "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        self.events.append(event)

        async def send() -> None:
            for listener in list(self.listeners):
                await listener.put(Message(event))

        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(send()))


class FakeAgent(Agent):
    """A guest agent that runs nothing: each command's result comes from ``respond``.

    ``respond(argv)`` returns an :class:`~qemukit.guest.ExecResult`, or
    ``(exit_status, stdout, stderr)``; without it every command exits 0 with
    no output. A string command arrives as ``("sh", "-c", text)``, as the
    real agents run it. :attr:`ran` keeps every argv.
    """

    def __init__(self, respond: Callable[[tuple[str, ...]], ExecResult | tuple[int, bytes, bytes]]
                 | None = None) -> None:
        super().__init__(Path("/nonexistent/fake-agent.sock"))
        self.respond = respond
        #: The argv of every command run, in order.
        self.ran: list[tuple[str, ...]] = []
        self.ready = True

    def __repr__(self) -> str:
        return f"<FakeAgent ran={len(self.ran)}>"

    async def ping(self, timeout: float) -> None:
        """Answers at once."""
        self.ready = True

    async def exec(self, command: str | Sequence[str], timeout: float | None = 60.0) -> ExecResult:
        """The result ``respond`` gives for ``command``."""
        argv = ("sh", "-c", command) if isinstance(command, str) else tuple(command)
        self.ran.append(argv)
        result = self.respond(argv) if self.respond is not None else (0, b"", b"")
        if isinstance(result, ExecResult):
            return result
        status, stdout, stderr = result
        return ExecResult(argv, status, stdout, stderr, 0.0)

    async def close(self) -> None:
        """Nothing to close."""


class FakeVM:
    """A running VM without QEMU: a :class:`~qemukit.target.VMTarget` for unit tests.

    ``runtime`` is a directory for the VM's state files (the hot-plug ledger,
    the operation lock); ``spec`` sizes the model (its ``hotplug_ports``,
    ``cpus``/``max_cpus``, ``memory``); ``version`` is the QEMU version
    reported (hot-plug rules depend on it); ``agent`` answers guest
    commands (a :class:`FakeAgent` that runs everything by default).
    """

    def __init__(self, runtime: str | Path, spec: VMSpec, *, version: tuple[int, int] = (7, 2),
                 agent: FakeAgent | None = None, name: str = "fake",
                 qemu: host.QemuBinary | None = None) -> None:
        self.spec = spec
        self.name = name
        #: The QEMU binary the VM "runs on" (a disk hot-plug asks its qemu-img about the
        #: image); by default the spec architecture's usual paths, without probing.
        self.qemu = qemu or host.QemuBinary(
            f"/usr/bin/{ARCHES[spec.arch].qemu_binary}", (*version, 0), ".".join(map(str, version)),
            frozenset(ARCHES[spec.arch].machines), True, "/usr/bin/qemu-img")
        self.runtime = RuntimeDir(Path(runtime))
        self.accel = host.AccelChoice("tcg", "a fake VM")
        self.monitor = FakeMonitor()
        self.agent = agent if agent is not None else FakeAgent()
        self.version = version
        #: Every QMP command run, with its arguments, in order.
        self.log: list[tuple[str, dict[str, Any]]] = []
        #: QEMU's run state: ``running`` or ``paused`` (``stop`` and ``cont`` change it).
        self.run_state = "running"
        #: /machine/peripheral: device id -> driver (the agent's serial port is there).
        self.peripheral: dict[str, str] = {"vser0": "virtio-serial-pci"}
        #: PCIe root ports for hot-plug -> the device plugged in each (None: free).
        self.ports: dict[str, str | None] = {f"hp{i}": None for i in range(spec.hotplug_ports)}
        self.nodes: set[str] = set()
        self.objects: set[str] = set()
        self.netdevs: set[str] = set()
        self.dimms: list[dict[str, Any]] = []
        self.cpus: list[dict[str, Any]] = [
            {"props": {"core-id": i, "socket-id": 0, "thread-id": 0}, "vcpus-count": 1,
             "type": "qemu64-x86_64-cpu"} for i in range(spec.max_cpus or spec.cpus)]
        for cpu in self.cpus[: spec.cpus]:
            cpu["qom-path"] = "/machine/unattached/device[0]"
        #: What the guest does on ``device_del`` (see :data:`Unplug`).
        self.on_unplug: Unplug = "delete"
        #: Commands that fail: command -> the error description QEMU gives.
        self.fail: dict[str, str] = {}
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {}
        #: True once the guest agent answered (a fake guest has booted).
        self.guest_booted = True
        #: How the fake was stopped (None while it runs).
        self.stopped: str | None = None

    def __repr__(self) -> str:
        return f"<FakeVM {self.name!r} {self.run_state} commands={len(self.log)}>"

    @property
    def has_agent(self) -> bool:
        """True if the spec has an in-guest agent."""
        return self.spec.agent != "none"

    @property
    def guest(self) -> AsyncGuest:
        """The guarded guest agent, over :attr:`agent`."""
        return AsyncGuest(self, self.agent)

    @property
    def mutations(self) -> list[str]:
        """The commands run that change the VM (:data:`MUTATING`), in order."""
        return [c for c, _ in self.log if c in MUTATING]

    def commands(self, name: str) -> list[dict[str, Any]]:
        """The arguments of each run of the QMP command ``name``, in order."""
        return [args for c, args in self.log if c == name]

    def on_command(self, name: str, handler: Callable[[dict[str, Any]], Any]) -> None:
        """Answer the QMP command ``name`` with ``handler(arguments)`` (its return value).

        A handler may raise :class:`~qemukit.errors.QMPCommandError` as QEMU
        refuses, and call :meth:`model` for what the fake would have done.
        """
        self._handlers[name] = handler

    # -- VMTarget --------------------------------------------------------------------------

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = 30.0, **kwargs: Any) -> Any:
        """Run ``command`` against the model (``-`` for ``_`` in keyword names, as AsyncVM)."""
        args = dict(arguments or {})
        args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        self.log.append((command, args))
        if command in self.fail:
            raise QMPCommandError(command, "GenericError", self.fail[command])
        handler = self._handlers.get(command)
        return handler(args) if handler is not None else self.model(command, args)

    def model(self, command: str, arguments: dict[str, Any]) -> Any:
        """What the built-in model answers to ``command`` (for a handler that wraps it)."""
        handler = getattr(self, "_do_" + command.replace("-", "_"), None)
        if handler is None:
            raise QMPCommandError(command, "CommandNotFound",
                                  f"The command {command} has not been found")
        return handler(arguments)

    async def status(self) -> str:
        """The run state."""
        return self.run_state

    async def pause(self) -> None:
        """Stop the vCPUs; returns once the STOP event came."""
        with self.monitor.listen("STOP") as listener:
            if self.run_state == "paused":
                return
            await self.qmp("stop")
            await self.monitor.wait_event(listener, 5.0, "the STOP event after 'stop'")

    async def resume(self) -> None:
        """Let the vCPUs run; returns once the RESUME event came."""
        with self.monitor.listen("RESUME") as listener:
            if self.run_state == "running":
                return
            await self.qmp("cont")
            await self.monitor.wait_event(listener, 5.0, "the RESUME event after 'cont'")

    async def wait_ready(self, timeout: float | None = None) -> float:
        """The fake guest is always ready."""
        return 0.0

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str, *,
                      guest_io: bool = False, guest_faults: bool = True) -> T:
        """Await ``aw`` within ``timeout`` (a fake QEMU never exits, its guest never panics)."""
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError:
            raise WaitTimeout(what, timeout or 0) from None

    def qemu_alive(self) -> bool:
        """True until :meth:`shutdown`."""
        return self.stopped is None

    async def reset_agent(self) -> None:
        """The guest is rebooting: the agent answers again at once."""

    def forget_guest_faults(self) -> None:
        """No faults are recorded."""

    def operation_lock(self, timeout: float = 5.0) -> AbstractAsyncContextManager[None]:
        """The same ``flock`` on ``ops.lock`` in the runtime directory as a real VM's."""
        self.runtime.path.mkdir(parents=True, exist_ok=True)
        return self.runtime.operation_lock(timeout)

    async def shutdown(self, timeout: float = 30.0, *, quit_timeout: float = 5.0,
                       term_timeout: float = 5.0, kill_timeout: float = 5.0) -> str:
        """Mark the fake stopped; returns ``"quit"``."""
        self.stopped = "quit"
        self.monitor.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.monitor.disconnect()
        return self.stopped

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0,
                   check: bool = False, stdin: bytes | None = None) -> ExecResult:
        """Run ``command`` on the fake agent (as :meth:`qemukit.vm.AsyncVM.exec`)."""
        result = await self.guest.exec(command, timeout, stdin=stdin)
        if check and result.exit_status != 0:
            from .errors import GuestError

            raise GuestError(f"{command!r} exited with {result.exit_status}")
        return result

    # -- the model: queries ---------------------------------------------------------------

    def _do_query_status(self, args: dict[str, Any]) -> Any:
        return {"status": self.run_state, "running": self.run_state == "running"}

    def _do_query_version(self, args: dict[str, Any]) -> Any:
        return {"qemu": {"major": self.version[0], "minor": self.version[1], "micro": 0},
                "package": ""}

    def _do_qom_list(self, args: dict[str, Any]) -> Any:
        if args["path"] == "/objects":
            return [{"name": o, "type": "child<memory-backend-ram>"} for o in self.objects]
        return [{"name": "type", "type": "string"}] + [
            {"name": n, "type": f"child<{t}>"} for n, t in self.peripheral.items()]

    def _do_query_named_block_nodes(self, args: dict[str, Any]) -> Any:
        return [{"node-name": n} for n in self.nodes]

    def _do_query_pci(self, args: dict[str, Any]) -> Any:
        devices = [{"qdev_id": port,
                    "pci_bridge": {"devices": [] if dev is None else [{"qdev_id": dev}]}}
                   for port, dev in self.ports.items()]
        return [{"bus": 0, "devices": devices}]

    def _do_query_hotpluggable_cpus(self, args: dict[str, Any]) -> Any:
        return self.cpus

    def _do_query_memory_size_summary(self, args: dict[str, Any]) -> Any:
        return {"base-memory": self.spec.memory << 20,
                "plugged-memory": sum(d["data"]["size"] for d in self.dimms)}

    def _do_query_memory_devices(self, args: dict[str, Any]) -> Any:
        return self.dimms

    def _do_human_monitor_command(self, args: dict[str, Any]) -> Any:
        return ""

    # -- the model: changes ---------------------------------------------------------------

    def _do_stop(self, args: dict[str, Any]) -> Any:
        if self.run_state != "paused":
            self.run_state = "paused"
            self.monitor.emit("STOP")
        return {}

    def _do_cont(self, args: dict[str, Any]) -> Any:
        if self.run_state != "running":
            self.run_state = "running"
            self.monitor.emit("RESUME")
        return {}

    def _do_blockdev_add(self, args: dict[str, Any]) -> Any:
        self.nodes.add(args["node-name"])
        return {}

    def _do_blockdev_del(self, args: dict[str, Any]) -> Any:
        if args["node-name"] not in self.nodes:
            raise QMPCommandError("blockdev-del", "GenericError",
                                  f"Failed to find node with node-name='{args['node-name']}'")
        self.nodes.remove(args["node-name"])
        return {}

    def _do_netdev_add(self, args: dict[str, Any]) -> Any:
        self.netdevs.add(args["id"])
        return {}

    def _do_netdev_del(self, args: dict[str, Any]) -> Any:
        self.netdevs.remove(args["id"])
        return {}

    def _do_object_add(self, args: dict[str, Any]) -> Any:
        self.objects.add(args["id"])
        return {}

    def _do_object_del(self, args: dict[str, Any]) -> Any:
        self.objects.remove(args["id"])
        return {}

    def _do_device_add(self, args: dict[str, Any]) -> Any:
        dev_id, driver = args["id"], args["driver"]
        self.peripheral[dev_id] = driver
        if args.get("bus") in self.ports:
            self.ports[args["bus"]] = dev_id
        if driver == "pc-dimm":
            self.dimms.append({"type": "dimm", "data": {"id": dev_id, "size": 128 << 20}})
        if driver.endswith("-cpu"):
            slot = next(c for c in self.cpus if c["props"]["core-id"] == args["core-id"])
            slot["qom-path"] = f"/machine/peripheral/{dev_id}"
        if driver == "pc-dimm" or driver.endswith("-cpu"):
            self.monitor.emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 1,
                                                           "status": 0}})
        return {}

    def _do_device_del(self, args: dict[str, Any]) -> Any:
        dev_id = args["id"]
        if dev_id not in self.peripheral:
            raise QMPCommandError("device_del", "DeviceNotFound", f"Device '{dev_id}' not found")
        path = f"/machine/peripheral/{dev_id}"
        if self.on_unplug == "delete":
            self.remove_device(dev_id)
            self.monitor.emit("DEVICE_DELETED", {"path": f"{path}/virtio-backend"})
            self.monitor.emit("DEVICE_DELETED", {"device": dev_id, "path": path})
        elif self.on_unplug == "guest-error":
            self.monitor.emit("DEVICE_UNPLUG_GUEST_ERROR", {"device": dev_id, "path": path})
        elif self.on_unplug == "ost-busy":
            for status in (0x84, 0x82):
                self.monitor.emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 3,
                                                               "status": status}})
        return {}

    def remove_device(self, dev_id: str) -> None:
        """Take ``dev_id`` out of the model, as when the guest released it (no event)."""
        del self.peripheral[dev_id]
        for port, dev in self.ports.items():
            if dev == dev_id:
                self.ports[port] = None
        self.dimms = [d for d in self.dimms if d["data"]["id"] != dev_id]
        for cpu in self.cpus:
            if cpu.get("qom-path") == f"/machine/peripheral/{dev_id}":
                del cpu["qom-path"]
