"""``qemukit mcp``: throwaway VMs for coding agents, over the Model Context Protocol (stdio).

:class:`Sandbox` is the part without the protocol: it starts VMs from a
built-in image or template (warm where qemukit can, see :mod:`qemukit.warm`),
runs commands, reads and writes files, lists and stops them, within limits
(:class:`Limits`: how many VMs, how much memory each and all together, how
many vCPUs). :func:`serve` puts it behind the official ``mcp`` SDK's stdio
server (``pip install 'qemukit[mcp]'``).

Every VM dies with the server: each is owned by the server process
(``die_with_parent``, so a SIGKILLed server's QEMUs get the parent-death
signal), and all are stopped when the client closes stdin or sends SIGTERM.
A VM gets no host share and no port forward unless the tool call asks, and a
forward binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import images, templates
from .errors import QemukitError, SpecError
from .spec import Nic, PortForward, Share, VMSpec, parse_size
from .vm import AsyncVM

__all__ = ["INSTALL_HINT", "Limits", "Sandbox", "build_server", "serve"]

log = logging.getLogger(__name__)

#: The one line printed when the ``mcp`` SDK is missing.
INSTALL_HINT = "qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'"
#: The largest file read_file and write_file move: the bytes travel on the copy channel (a
#: virtio-serial port, see VM.copy_in), but the MCP message carries them whole, as text.
_FILE_LIMIT = 64 << 20


@dataclass(frozen=True)
class Limits:
    """What a client may ask for."""

    max_vms: int = 2
    max_memory_mib: int = 4096
    max_total_memory_mib: int = 8192
    max_cpus: int = 4
    boot_timeout: float = 300.0


class Sandbox:
    """The VMs one MCP server started; every method raises QemukitError on bad input."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.vms: dict[str, AsyncVM] = {}
        self._lock = asyncio.Lock()

    def _spec(self, image: str | None, template: str | None, name: str | None,
              memory: str | int | None, cpus: int | None, share: str | None,
              forwards: list[str] | None) -> VMSpec:
        if image and template:
            raise SpecError("template", template, "give either image or template, not both")
        if template:
            spec = templates.load_spec(template)
        else:
            chosen = image or "tiny"
            if chosen not in images.NAMES:
                raise SpecError("image", chosen, f"unknown image; choose from {', '.join(images.NAMES)}")
            spec = images.spec(chosen)
        # No port forwards unless asked: nothing here watches the guest's listeners.
        changes: dict[str, Any] = {"warm": True, "forward_auto": False}
        if name is not None:
            changes["name"] = name
        if memory is not None:
            changes["memory"] = parse_size(memory, "memory")
        if cpus is not None:
            changes["cpus"] = cpus
        if share is not None:
            changes["shares"] = (Share.parse(share),)
            path = Path(changes["shares"][0].host_path)
            if not path.is_dir():
                raise SpecError("share", share, f"{path} is not a directory on the host")
        if forwards:
            parsed = tuple(PortForward.parse(f) for f in forwards)
            for fw in parsed:
                if fw.host_addr != "127.0.0.1":
                    raise SpecError("forward", str(fw), "forwards bind 127.0.0.1 only")
            first = spec.nics[0] if spec.nics else Nic()
            changes["nics"] = (Nic(forwards=first.forwards + parsed), *spec.nics[1:])
        spec = spec.replace(**changes)
        lim = self.limits
        if spec.memory > lim.max_memory_mib:
            raise SpecError("memory", spec.memory, f"this server allows at most {lim.max_memory_mib} MiB "
                            "per VM (qemukit mcp --max-memory)")
        if spec.cpus > lim.max_cpus:
            raise SpecError("cpus", spec.cpus, f"this server allows at most {lim.max_cpus} vCPUs")
        for nic in spec.nics:
            for fw in nic.forwards:
                if fw.host_addr != "127.0.0.1":
                    raise SpecError("forward", str(fw), "forwards bind 127.0.0.1 only")
        return spec

    async def start(self, *, image: str | None = None, template: str | None = None,
                    name: str | None = None, memory: str | int | None = None,
                    cpus: int | None = None, share: str | None = None,
                    forwards: list[str] | None = None) -> dict[str, Any]:
        """Start a VM and wait until its agent answers; its name, boot time and how it started."""
        spec = self._spec(image, template, name, memory, cpus, share, forwards)
        async with self._lock:
            lim = self.limits
            if len(self.vms) >= lim.max_vms:
                raise SpecError("vms", len(self.vms), f"this server runs at most {lim.max_vms} VMs at "
                                "once (qemukit mcp --max-vms); stop one first")
            used = sum(vm.spec.memory for vm in self.vms.values())
            if used + spec.memory > lim.max_total_memory_mib:
                raise SpecError("memory", spec.memory, f"{used} MiB are in use; all VMs together may "
                                f"use at most {lim.max_total_memory_mib} MiB")
            vm = AsyncVM(spec, die_with_parent=True, boot_timeout=lim.boot_timeout)
            try:
                await vm.start()
                seconds = await vm.wait_ready(lim.boot_timeout)
            except BaseException:
                if vm.state.value == "running":
                    await vm.kill()
                raise
            self.vms[vm.name] = vm
        return {"name": vm.name, "seconds_to_ready": round(seconds, 2), "memory_mib": spec.memory,
                "cpus": spec.cpus, "agent": spec.agent}

    def _vm(self, name: str) -> AsyncVM:
        vm = self.vms.get(name)
        if vm is None:
            known = ", ".join(sorted(self.vms)) or "none"
            raise SpecError("name", name, f"no VM of this server has this name (running: {known})")
        return vm

    async def exec(self, name: str, command: str | list[str], timeout: float = 60.0
                   ) -> dict[str, Any]:
        """Run ``command`` (a list as argv, a string as shell code) in VM ``name``."""
        if isinstance(command, list) and not command:
            raise SpecError("command", command, "must not be empty")
        result = await self._vm(name).exec(command, timeout=timeout)
        return {"exit_status": result.exit_status, "stdout": result.stdout_text,
                "stderr": result.stderr_text, "seconds": round(result.duration, 3)}

    async def read_file(self, name: str, path: str) -> bytes:
        """The contents of ``path`` in VM ``name`` (at most 64 MiB bytes)."""
        vm = self._vm(name)
        with tempfile.TemporaryDirectory(prefix="qemukit-mcp-") as scratch:
            local = await vm.copy_out(path, Path(scratch) / "file", timeout=300.0)
            size = local.stat().st_size
            if size > _FILE_LIMIT:
                raise SpecError("path", path, f"is {size} bytes; read_file moves at most "
                                f"{_FILE_LIMIT} (copy it with qemukit cp)")
            return local.read_bytes()

    async def write_file(self, name: str, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in VM ``name`` (created or replaced, mode 0644)."""
        vm = self._vm(name)
        if len(data) > _FILE_LIMIT:
            raise SpecError("content", f"{len(data)} bytes", f"write_file moves at most "
                            f"{_FILE_LIMIT} bytes per file")
        # Like cp, copy_in writes into a directory it is given: here a directory is an error.
        check = await vm.exec(["sh", "-c", '[ ! -d "$1" ]', "sh", path])
        if check.exit_status != 0:
            raise SpecError("path", path, "is a directory in the guest")
        with tempfile.TemporaryDirectory(prefix="qemukit-mcp-") as scratch:
            local = Path(scratch) / "file"
            local.write_bytes(data)
            local.chmod(0o644)
            await vm.copy_in(local, path, timeout=300.0)

    def list(self) -> list[dict[str, Any]]:
        """The VMs this server started and runs."""
        return [{"name": n, "pid": vm.pid, "state": vm.state.value, "memory_mib": vm.spec.memory,
                 "cpus": vm.spec.cpus} for n, vm in sorted(self.vms.items())]

    async def stop(self, name: str) -> dict[str, Any]:
        """Stop VM ``name`` (the shutdown ladder) and forget it."""
        vm = self._vm(name)
        del self.vms[name]
        result = await vm.shutdown(timeout=10)
        return {"name": name, "stopped_by": str(getattr(result, "rung", result))}

    async def stop_all(self) -> None:
        """End every VM this server started (at server exit): they are throwaway, so no ladder."""
        vms, self.vms = list(self.vms.values()), {}
        results = await asyncio.gather(*(vm.kill() for vm in vms), return_exceptions=True)
        for vm, result in zip(vms, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("ending VM %s failed: %s", vm.name, result)


def _tool_error(exc: QemukitError) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    return ToolError(str(exc))


def build_server(sandbox: Sandbox) -> Any:
    """The MCP server (``mcp.server.mcpserver.MCPServer``) whose tools drive ``sandbox``."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("qemukit", instructions=(
        "Throwaway Linux VMs (QEMU). start_vm, then exec / read_file / write_file with its name, "
        "then stop_vm. Every VM is stopped when this server exits."))

    @server.tool()
    async def start_vm(image: str | None = None, template: str | None = None,
                       name: str | None = None, memory: str | None = None,
                       cpus: int | None = None, share: str | None = None,
                       forwards: list[str] | None = None) -> dict[str, Any]:
        """Start a throwaway VM and wait until it is ready; returns its name.

        image: a built-in image (tiny, the default, or debian); template: a built-in
        template (tiny, debian, debian-dev, kernel-test) instead. memory like "512M";
        share "HOST_DIR:GUEST_DIR" shares a host directory (none unless asked);
        forwards ["HOSTPORT:GUESTPORT"] forward 127.0.0.1 ports to the guest.
        """
        try:
            return await sandbox.start(image=image, template=template, name=name, memory=memory,
                                       cpus=cpus, share=share, forwards=forwards)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    @server.tool()
    async def exec(name: str, command: list[str] | str, timeout: float = 60.0) -> dict[str, Any]:
        """Run a command in VM name: a list runs as argv, a string as shell code.

        Returns exit_status, stdout, stderr; the command is killed after timeout seconds.
        """
        try:
            return await sandbox.exec(name, command, timeout)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    @server.tool()
    async def read_file(name: str, path: str, encoding: str = "utf-8") -> str:
        """The contents of file path in VM name (up to 64 MiB), as text (encoding utf-8) or base64."""
        try:
            data = await sandbox.read_file(name, path)
        except QemukitError as exc:
            raise _tool_error(exc) from exc
        return base64.b64encode(data).decode() if encoding == "base64" else data.decode("utf-8", "replace")

    @server.tool()
    async def write_file(name: str, path: str, content: str, encoding: str = "utf-8") -> str:
        """Write content to file path in VM name (utf-8 text, or base64 with encoding base64).

        Up to 64 MiB; the file is created or replaced with mode 0644.
        """
        if encoding not in ("utf-8", "base64"):
            raise _tool_error(SpecError("encoding", encoding, "must be utf-8 or base64"))
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            await sandbox.write_file(name, path, data)
        except ValueError as exc:
            raise _tool_error(SpecError("content", "...", f"not base64: {exc}")) from exc
        except QemukitError as exc:
            raise _tool_error(exc) from exc
        return f"wrote {len(data)} bytes to {path}"

    @server.tool()
    async def list_vms() -> list[dict[str, Any]]:
        """The VMs this server started and still runs."""
        return sandbox.list()

    @server.tool()
    async def stop_vm(name: str) -> dict[str, Any]:
        """Stop VM name and throw it away."""
        try:
            return await sandbox.stop(name)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    return server


async def _serve(limits: Limits) -> None:
    sandbox = Sandbox(limits)
    server = build_server(sandbox)
    loop = asyncio.get_running_loop()

    async def on_term() -> None:
        log.info("SIGTERM: stopping %d VM(s)", len(sandbox.vms))
        await sandbox.stop_all()
        # The stdio transport reads stdin in a worker thread that a cancel cannot
        # interrupt, so the process ends here, its VMs already stopped.
        os._exit(143)

    terms: list[asyncio.Task[None]] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: terms.append(loop.create_task(on_term())))
    try:
        await server.run_stdio_async()
    finally:
        log.info("stdin closed: stopping %d VM(s)", len(sandbox.vms))
        await sandbox.stop_all()


def serve(limits: Limits | None = None) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin (or SIGTERM); all VMs stop then."""
    asyncio.run(_serve(limits or Limits()))
