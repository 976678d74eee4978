"""``qemukit mcp``: throwaway VMs for coding agents, over the Model Context Protocol (stdio).

:class:`Sandbox` is the part without the protocol: it starts VMs from a
built-in image or template (warm where qemukit can, see :mod:`qemukit.warm`),
runs commands, reads and writes files, lists and stops them. :func:`serve`
puts it behind the official ``mcp`` SDK's stdio server
(``pip install 'qemukit[mcp]'``).

The client (a coding agent) is treated as hostile: what it may reach is what
the operator who started the server allowed, and nothing more
(docs/threat/mcp.md says it in full):

- a VM is built from a built-in image, or from a template named by name: a
  built-in one or a ``NAME.toml`` in a directory the operator named
  (``--template-dir``), never a path the client gives;
- the client sets only :data:`CLIENT_FIELDS`; a template only
  :data:`TEMPLATE_FIELDS`; and the spec that results may differ from its
  built-in image's only in :data:`SPEC_FIELDS` (a whitelist: kernel, initrd,
  drives, cloud-init, ``extra_args``, ``sandbox``, QMP and gdb ports are
  always the image's own);
- no host share unless inside a directory the operator allowed
  (``--allow-share DIR[:ro|:rw]``), at that directory's mode at most; a
  template's ``host_root`` is a share of ``/`` and of its ``rw`` directories,
  checked the same way;
- no network unless the operator allows it (``--allow-network``): user
  networking reaches the host's loopback services;
- :class:`Limits` caps VMs, memory, vCPUs, overlay disk, console log, exec
  output (cut in the guest while it is produced), file transfers (sizes
  checked before any byte moves) and each VM's lifetime.

Every refusal is a :class:`~qemukit.errors.SpecError` naming the field and the
limit, raised before any process starts; the MCP layer turns it into a tool
error. Every VM dies with the server: each is owned by the server process
(``die_with_parent``, so a SIGKILLed server's QEMUs get the parent-death
signal), and all are stopped when the client closes stdin or sends SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import logging
import os
import re
import shlex
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import images
from .errors import QemukitError, SpecError
from .resolve import Request, resolve
from .snapshot._checkpoint import CHECKPOINT_FILE
from .spec import (
    TEMPLATE_DIR,
    Nic,
    PortForward,
    Share,
    VMSpec,
    load_toml,
    parse_size,
    resolve_spec_file,
    template_names,
)
from .vm import AsyncVM, _standby
from .vm._fork import check_count

__all__ = [
    "CLIENT_FIELDS",
    "INSTALL_HINT",
    "SPEC_FIELDS",
    "TEMPLATE_FIELDS",
    "Limits",
    "Sandbox",
    "ShareGrant",
    "build_server",
    "serve",
]

log = logging.getLogger(__name__)

#: The one line printed when the ``mcp`` SDK is missing.
INSTALL_HINT = "qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'"

#: What a client's ``start_vm`` may give, and nothing else.
CLIENT_FIELDS = ("image", "template", "name", "memory", "cpus", "share", "forwards")
#: The keys a template served over MCP may hold (its whole ``base`` chain merged), built-in
#: or from a ``--template-dir``. Everything naming a host file (kernel, initrd, drives,
#: cloud_init) or changing how QEMU runs (extra_args, sandbox, qmp_tcp_port, ...) is refused.
TEMPLATE_FIELDS = ("base", "description", "image", "cpus", "memory", "append", "no_reboot",
                   "warm", "shares", "host_root")
#: The fields in which a VM's spec may differ from its built-in image's spec.
SPEC_FIELDS = ("name", "memory", "cpus", "append", "no_reboot", "warm", "forward_auto",
               "shares", "nics", "host_root", "standby")

#: The checkpoints one VM keeps (each holds its RAM on the host's disk, counted in
#: ``max_disk``); a newer one drops the oldest.
MAX_CHECKPOINTS = 8

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: How often the watcher of each VM checks its lifetime, overlays and console log.
_WATCH_INTERVAL = 2.0
#: What is kept of a console log cut back to its cap (its newest bytes).
_CONSOLE_KEEP = 64 * 1024
_NO_NETWORK = ("this server gives its VMs no network: QEMU's user networking would let the "
               "guest reach every service on the host's 127.0.0.1 (at 10.0.2.2); the operator "
               "allows it with qemukit mcp --allow-network")
#: While a file is copied out, how often its size on the host is checked.
_COPY_POLL = 0.2


@dataclass(frozen=True)
class Limits:
    """The operator's caps on what a client may use (sizes of memory in MiB, else bytes).

    ``max_disk`` caps the bytes the overlays of one VM's disks hold on the host;
    ``max_console_log`` the console log kept (older output is dropped);
    ``max_output`` each of stdout and stderr of one exec (cut in the guest);
    ``max_file`` one read_file or write_file; ``max_lifetime`` (seconds) how
    long a VM may run before the server stops it.
    """

    max_vms: int = 2
    max_memory_mib: int = 4096
    max_total_memory_mib: int = 8192
    max_cpus: int = 4
    max_disk: int = 8 << 30
    max_console_log: int = 16 << 20
    max_output: int = 1 << 20
    max_file: int = 16 << 20
    max_lifetime: float = 3600.0
    boot_timeout: float = 300.0


@dataclass(frozen=True)
class ShareGrant:
    """A host directory the operator lets clients share (and below it), read-only unless writable."""

    path: Path
    writable: bool = False

    @classmethod
    def parse(cls, text: str) -> ShareGrant:
        """``DIR``, ``DIR:ro`` or ``DIR:rw``: an existing directory, its symlinks resolved."""
        path, mode = text, "ro"
        head, sep, tail = text.rpartition(":")
        if sep and tail in ("ro", "rw"):
            path, mode = head, tail
        real = Path(os.path.realpath(path))
        if not path or not real.is_dir():
            raise SpecError("allow_share", text, "must be an existing directory, DIR[:ro|:rw]")
        return cls(real, mode == "rw")

    def __str__(self) -> str:
        return f"{self.path}:{'rw' if self.writable else 'ro'}"


def _inside(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


@dataclass
class _Running:
    """One VM of the server, the task watching it, and when it must end."""

    vm: AsyncVM
    deadline: float
    watcher: asyncio.Task[None] | None = None
    #: Its checkpoints' ids, oldest first (see :meth:`Sandbox.checkpoint`).
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    #: The number in the next checkpoint's id.
    next_checkpoint: int = 1


class Sandbox:
    """The VMs one MCP server started; every method raises QemukitError on bad input.

    ``shares`` are the host directories clients may share; ``template_dirs``
    the directories whose ``NAME.toml`` files clients may name as templates
    (checked like built-in ones: see :data:`TEMPLATE_FIELDS`). ``cwd`` is what
    ``${PWD}`` in a template means (the server's working directory).
    ``network=False`` (the default) gives every VM no NIC at all, whatever its
    image has: QEMU's user networking lets a guest reach every service on the
    host's 127.0.0.1 at 10.0.2.2, so it is the operator's choice.
    """

    def __init__(self, limits: Limits | None = None, *, shares: Sequence[ShareGrant] = (),
                 template_dirs: Sequence[str | Path] = (), cwd: str | Path | None = None,
                 network: bool = False, watch_interval: float = _WATCH_INTERVAL) -> None:
        self.limits = limits or Limits()
        self.network = network
        self.shares = tuple(shares)
        self.template_dirs = tuple(Path(os.path.realpath(d)) for d in template_dirs)
        for d in self.template_dirs:
            if not d.is_dir():
                raise SpecError("template_dir", str(d), "is not a directory")
        self.cwd = str(cwd) if cwd is not None else os.getcwd()
        self.watch_interval = watch_interval
        self._running: dict[str, _Running] = {}
        #: Why the server stopped a VM by itself (lifetime, disk), told on the next call naming it.
        self.ended: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def vms(self) -> dict[str, AsyncVM]:
        """The running VMs by name."""
        return {n: r.vm for n, r in self._running.items()}

    # -- what a VM may be -------------------------------------------------------------

    def _template_file(self, template: str) -> Path:
        """The file of a template name: built-in first, then the operator's directories."""
        if not isinstance(template, str) or not _TEMPLATE_NAME.fullmatch(template):
            raise SpecError("template", template, "must be a template name (a built-in one, or "
                            "NAME for NAME.toml in a directory the operator gave with "
                            "--template-dir), never a path")
        if template in template_names():
            return TEMPLATE_DIR / f"{template}.toml"
        for top in self.template_dirs:
            candidate = top / f"{template}.toml"
            if candidate.is_file():
                real = Path(os.path.realpath(candidate))
                if not _inside(real, top):
                    raise SpecError("template", template, f"{candidate} leads out of {top}")
                return real
        dirs = ", ".join(str(d) for d in self.template_dirs) or "none given"
        raise SpecError("template", template, f"unknown template; built-in: "
                        f"{', '.join(template_names())}; --template-dir: {dirs}")

    def _check_bases(self, first: Path) -> None:
        """Every file ``base`` in the chain lies in the built-in or an operator's template dir."""
        tops = (TEMPLATE_DIR.resolve(), *self.template_dirs)
        seen: set[Path] = set()
        file = first
        while file not in seen:
            seen.add(file)
            base = load_toml(file).get("base")
            if not isinstance(base, str) or not ("/" in base or base.endswith(".toml")):
                return  # none, a built-in name, or a mistake resolve_spec_file names
            file = Path(os.path.realpath(file.parent / base))
            if not any(_inside(file, top) for top in tops):
                raise SpecError(f"{first.name}: base", base, "a template served over MCP may "
                                "build only on a built-in template or a file in a --template-dir")

    def _template_spec(self, template: str) -> tuple[VMSpec, VMSpec, list[Share]]:
        """(the template's spec, its image's spec, its shares) after the key whitelist."""
        file = self._template_file(template)
        self._check_bases(file)
        data, origins = resolve_spec_file(file, cwd=self.cwd)
        for key in data:
            if key not in TEMPLATE_FIELDS:
                raise SpecError(f"{origins.get(key, template)}: {key}", data[key],
                                "a template served over MCP may set only "
                                f"{', '.join(TEMPLATE_FIELDS)} (qemukit mcp refuses the rest)")
        image = data.get("image")
        if image not in images.NAMES:
            raise SpecError(f"{template}: image", image, "a template served over MCP must name "
                            f"a built-in image ({', '.join(images.NAMES)})")
        base = images.spec(image)
        scalars = {k: data[k] for k in ("cpus", "memory", "append", "no_reboot", "warm",
                                        "host_root") if k in data}
        shares = []
        for item in data.get("shares", ()):
            try:
                shares.append(Share(**item) if isinstance(item, Mapping) else Share.parse(item))
            except TypeError as exc:
                raise SpecError(f"{template}: shares", item, str(exc)) from exc
        return base.replace(**scalars) if scalars else base, base, shares

    def _grant(self, share: Share, field: str) -> Share:
        """``share`` with its real path and at most its grant's mode; SpecError outside every grant."""
        real = Path(os.path.realpath(share.host_path))
        grants = [g for g in self.shares if _inside(real, g.path)]
        if not grants:
            allowed = ", ".join(str(g) for g in self.shares) or "none"
            raise SpecError(field, str(share.host_path), "is outside every directory this server "
                            f"may share (allowed: {allowed}; the operator adds one with "
                            "qemukit mcp --allow-share DIR[:ro|:rw])")
        if not real.is_dir():
            raise SpecError(field, str(share.host_path), f"{real} is not a directory on the host")
        writable = any(g.writable for g in grants)
        return dataclasses.replace(share, host_path=str(real),
                                   read_only=share.read_only or not writable)

    def _spec(self, image: str | None, template: str | None, name: str | None,
              memory: str | int | None, cpus: int | None, share: str | None,
              forwards: list[str] | None) -> tuple[VMSpec, list[str]]:
        """The spec a start_vm call asks for, checked; and notes on what was dropped."""
        notes: list[str] = []
        if image is not None and template is not None:
            raise SpecError("template", template, "give either image or template, not both")
        shares: list[Share] = []
        if template is not None:
            spec, base, template_shares = self._template_spec(template)
            for sh in template_shares:
                try:
                    shares.append(self._grant(sh, "share"))
                except SpecError as exc:
                    notes.append(f"template {template}'s share of {sh.host_path} was dropped: "
                                 f"{exc.reason}")
        else:
            chosen = "tiny" if image is None else image
            if chosen not in images.NAMES:
                raise SpecError("image", chosen, f"unknown image; choose from {', '.join(images.NAMES)}")
            spec = base = images.spec(chosen)
        # No automatic port forwards: nothing here watches the guest's listeners.
        changes: dict[str, Any] = {"warm": True, "forward_auto": False}
        if name is not None:
            changes["name"] = name
        if memory is not None:
            changes["memory"] = parse_size(memory, "memory")
        if cpus is not None:
            changes["cpus"] = cpus
        if share is not None:
            shares = [self._grant(Share.parse(share), "share")]
        changes["shares"] = tuple(shares)
        if not self.network:
            if forwards:
                raise SpecError("forwards", forwards, _NO_NETWORK)
            changes["nics"] = ()
        elif forwards:
            parsed = tuple(PortForward.parse(f) for f in forwards)
            first = spec.nics[0] if spec.nics else Nic()
            changes["nics"] = (dataclasses.replace(first, forwards=first.forwards + parsed),
                               *spec.nics[1:])
        spec = spec.replace(**changes)
        if spec.host_root is not None:  # its directories resolved before they are checked
            from .rootfs import resolve_host_root

            spec = resolve_host_root(spec)
        self.check_spec(spec, base)
        # Resolved as every front end resolves a VM (qemukit.resolve): always warm here.
        resolution = resolve(Request(spec=spec, warm=True, purpose="interactive"))
        return resolution.spec, notes

    def check_spec(self, spec: VMSpec, base: VMSpec) -> None:
        """Refuse ``spec`` unless it is ``base`` (a built-in image's) changed in :data:`SPEC_FIELDS`
        only, within the limits, its shares granted, its forwards on 127.0.0.1."""
        for f in dataclasses.fields(VMSpec):
            if f.name not in SPEC_FIELDS and getattr(spec, f.name) != getattr(base, f.name):
                raise SpecError(f.name, getattr(spec, f.name), "a VM served over MCP takes this "
                                "field from its built-in image only; it may change only "
                                f"{', '.join(SPEC_FIELDS)}")
        lim = self.limits
        if spec.memory > lim.max_memory_mib:
            raise SpecError("memory", spec.memory, f"this server allows at most {lim.max_memory_mib} "
                            "MiB per VM (qemukit mcp --max-memory)")
        if spec.cpus > lim.max_cpus:
            raise SpecError("cpus", spec.cpus, f"this server allows at most {lim.max_cpus} vCPUs "
                            "(qemukit mcp --max-cpus)")
        if spec.nics and not self.network:
            raise SpecError("nics", len(spec.nics), _NO_NETWORK)
        if len(spec.nics) > max(1, len(base.nics)):
            raise SpecError("nics", len(spec.nics), "a VM served over MCP has at most one NIC")
        for nic in spec.nics:
            if nic.kind != "user":
                raise SpecError("nic.kind", nic.kind, "a VM served over MCP has user networking only")
            for fw in nic.forwards:
                if fw.host_addr != "127.0.0.1":
                    raise SpecError("forward", str(fw), "forwards bind 127.0.0.1 only")
                if 0 < fw.host_port < 1024:
                    raise SpecError("forward", str(fw), "host ports below 1024 are not "
                                    "forwarded (use 0 for a free port, or 1024-65535)")
        # The host's root (a template's host_root) is a share of "/" too: refused unless the
        # operator granted "/" (--allow-share /:ro), its rw directories unless granted :rw.
        for sh in spec.all_shares:
            granted = self._grant(sh, "share")
            if granted.host_path != sh.host_path or granted.read_only != sh.read_only:
                raise SpecError("share", str(sh.host_path), "not as granted (resolve it first)")
        for drive in spec.drives:
            if not drive.read_only and not drive.overlay:
                raise SpecError("drive", str(drive.file), "a VM served over MCP writes its disks "
                                "only through a throwaway overlay")

    # -- lifecycle -------------------------------------------------------------------

    async def _room_for(self, vms: int, memory: int) -> bool:
        """Whether ``vms`` more QEMUs of ``memory`` MiB in all fit the limits beside the
        running VMs and this server's standby clones; if they fit only without the
        standbys, those are ended (they are spare capacity, never counted as free)."""
        lim = self.limits
        running = len(self._running)
        used = sum(r.vm.spec.memory for r in self._running.values())
        if running + vms > lim.max_vms or used + memory > lim.max_total_memory_mib:
            return False
        kept = _standby.kept_memory()
        if kept and (running + vms + len(kept) > lim.max_vms
                     or used + memory + sum(kept) > lim.max_total_memory_mib):
            await _standby.end_all()
        return True

    async def start(self, *, image: str | None = None, template: str | None = None,
                    name: str | None = None, memory: str | int | None = None,
                    cpus: int | None = None, share: str | None = None,
                    forwards: list[str] | None = None) -> dict[str, Any]:
        """Start a VM and wait until its agent answers; its name, boot time and how it started."""
        spec, notes = self._spec(image, template, name, memory, cpus, share, forwards)
        async with self._lock:
            lim = self.limits
            if len(self._running) >= lim.max_vms:
                raise SpecError("vms", len(self._running), f"this server runs at most "
                                f"{lim.max_vms} VMs at once (qemukit mcp --max-vms); stop one first")
            used = sum(r.vm.spec.memory for r in self._running.values())
            if used + spec.memory > lim.max_total_memory_mib:
                raise SpecError("memory", spec.memory, f"{used} MiB are in use; all VMs together "
                                f"may use at most {lim.max_total_memory_mib} MiB "
                                "(qemukit mcp --max-total-memory)")
            if spec.standby:  # a standby is one more QEMU: only where the limits leave room
                spec = spec.replace(standby=await self._room_for(2, 2 * spec.memory))
            if not spec.standby:
                await self._room_for(1, spec.memory)
            vm = AsyncVM(spec, die_with_parent=True, boot_timeout=lim.boot_timeout)
            deadline = time.monotonic() + lim.max_lifetime
            try:
                await vm.start()
                seconds = await vm.wait_ready(lim.boot_timeout)
            except BaseException:
                if vm.state.value == "running":
                    await vm.kill()
                raise
            running = self._running[vm.name] = _Running(vm, deadline)
            self.ended.pop(vm.name, None)
            running.watcher = asyncio.get_running_loop().create_task(self._watch(vm.name, running))
        out = {"name": vm.name, "seconds_to_ready": round(seconds, 2), "memory_mib": spec.memory,
               "cpus": spec.cpus, "agent": spec.agent, "lifetime_seconds": lim.max_lifetime,
               "shares": [{"host": str(s.host_path), "guest": s.guest_path, "tag": s.tag,
                           "read_only": s.read_only} for s in spec.all_shares]}
        if notes:
            out["notes"] = notes
        return out

    async def _watch(self, name: str, running: _Running) -> None:
        """Until the VM ends: stop it at its deadline or when its overlays pass the disk cap;
        cut its console log back when it passes its cap."""
        vm, lim = running.vm, self.limits
        while self._running.get(name) is running and vm.state.value == "running":
            reason = None
            if time.monotonic() >= running.deadline:
                reason = f"its lifetime of {lim.max_lifetime:g} s passed (qemukit mcp --max-lifetime)"
            else:
                used = await asyncio.to_thread(self.overlay_bytes, vm)
                if used > lim.max_disk:
                    reason = (f"its disk overlays hold {_size_text(used)}, over the cap of "
                              f"{_size_text(lim.max_disk)} (qemukit mcp --max-disk)")
            if reason is not None:
                log.warning("stopping VM %s: %s", name, reason)
                self.ended[name] = reason
                self._running.pop(name, None)
                try:
                    await vm.kill()
                except QemukitError as exc:
                    log.warning("stopping VM %s failed: %s", name, exc)
                return
            log_path = vm.console_log
            if log_path is not None:
                await asyncio.to_thread(cap_console_log, log_path, lim.max_console_log)
            await asyncio.sleep(min(self.watch_interval,
                                    max(0.0, running.deadline - time.monotonic())))

    @staticmethod
    def overlay_bytes(vm: AsyncVM) -> int:
        """Bytes the VM's throwaway overlays and checkpoints take on the host (allocated
        blocks, or size if more)."""
        runtime = vm.runtime
        if runtime is None:
            return 0
        total = 0
        for path in [*runtime.path.glob("overlay-*"), runtime.path / CHECKPOINT_FILE]:
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                total += max(st.st_blocks * 512, st.st_size)
        return total

    def _vm(self, name: str) -> AsyncVM:
        running = self._running.get(name)
        if running is None:
            if name in self.ended:
                raise SpecError("name", name, f"this server stopped the VM: {self.ended[name]}")
            known = ", ".join(sorted(self._running)) or "none"
            raise SpecError("name", name, f"no VM of this server has this name (running: {known})")
        return running.vm

    # -- inside a VM -------------------------------------------------------------------

    async def exec(self, name: str, command: str | list[str], timeout: float = 60.0
                   ) -> dict[str, Any]:
        """Run ``command`` (a list as argv, a string as shell code) in VM ``name``.

        Each of stdout and stderr is cut to ``max_output`` bytes in the guest, as it is
        written (a command writing more gets SIGPIPE); ``*_truncated`` says so.
        """
        if isinstance(command, list) and not command:
            raise SpecError("command", command, "must not be empty")
        if not isinstance(command, (str, list)) or (
                isinstance(command, list) and not all(isinstance(c, str) for c in command)):
            raise SpecError("command", command, "must be a string or a list of strings")
        vm = self._vm(name)
        cap = self.limits.max_output
        result = await vm.exec(bounded_script(command, cap), timeout=timeout)
        # The guest is the client's: a changed agent may send more, so cut here as well.
        out: dict[str, Any] = {"exit_status": result.exit_status,
                               "seconds": round(result.duration, 3)}
        for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            out[stream] = data[:cap].decode("utf-8", "replace")
            out[f"{stream}_truncated"] = len(data) > cap
        if out["stdout_truncated"] or out["stderr_truncated"]:
            out["output_limit_bytes"] = cap
        return out

    async def read_file(self, name: str, path: str) -> bytes:
        """The contents of ``path`` in VM ``name``; its size is checked in the guest first."""
        vm = self._vm(name)
        cap = self.limits.max_file
        probe = await vm.exec(["sh", "-c", 'if [ ! -e "$1" ]; then echo missing; '
                               'elif [ ! -f "$1" ]; then echo special; '
                               'else stat -L -c %s -- "$1"; fi', "sh", path], timeout=60.0)
        answer = probe.stdout_text.strip()
        if answer == "missing":
            raise SpecError("path", path, "no such file in the guest")
        if answer == "special":
            raise SpecError("path", path, "is not a regular file in the guest")
        if not answer.isdigit():
            raise SpecError("path", path, f"cannot stat it in the guest: {probe.stderr_text[:200]}")
        if int(answer) > cap:
            raise SpecError("path", path, f"is {int(answer)} bytes; read_file moves at most "
                            f"{_size_text(cap)} (qemukit mcp --max-file)")
        with tempfile.TemporaryDirectory(prefix="qemukit-mcp-") as scratch:
            local = Path(scratch) / "file"
            copy = asyncio.ensure_future(vm.copy_out(path, local, timeout=300.0))
            # The file may grow after the stat (the guest is the client's): the copy is
            # stopped as soon as more than the cap arrived.
            while not copy.done():
                await asyncio.wait({copy}, timeout=_COPY_POLL)
                # copy_out writes under a temporary name beside ``local``: count the directory.
                size = await asyncio.to_thread(_bytes_under, Path(scratch))
                if size > cap and not copy.done():
                    copy.cancel()
                    with contextlib.suppress(asyncio.CancelledError, QemukitError):
                        await copy
                    raise SpecError("path", path, f"grew past {_size_text(cap)} while it was "
                                    "copied; read_file stopped the copy (qemukit mcp --max-file)")
            copied = copy.result()
            if copied.stat().st_size > cap:
                raise SpecError("path", path, f"is more than {_size_text(cap)}; read_file moves "
                                "at most that (qemukit mcp --max-file)")
            return copied.read_bytes()

    async def write_file(self, name: str, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in VM ``name`` (created or replaced, mode 0644)."""
        vm = self._vm(name)
        cap = self.limits.max_file
        if len(data) > cap:
            raise SpecError("content", f"{len(data)} bytes", f"write_file moves at most "
                            f"{_size_text(cap)} per file (qemukit mcp --max-file)")
        # Like cp, copy_in writes into a directory it is given: here a directory is an error.
        check = await vm.exec(["sh", "-c", '[ ! -d "$1" ]', "sh", path])
        if check.exit_status != 0:
            raise SpecError("path", path, "is a directory in the guest")
        with tempfile.TemporaryDirectory(prefix="qemukit-mcp-") as scratch:
            local = Path(scratch) / "file"
            local.write_bytes(data)
            local.chmod(0o644)
            await vm.copy_in(local, path, timeout=300.0)

    # -- checkpoints and forks ----------------------------------------------------------

    async def checkpoint(self, name: str) -> dict[str, Any]:
        """Checkpoint VM ``name`` (RAM and disks, see :mod:`qemukit.snapshot._checkpoint`);
        its id for :meth:`rollback`. Past :data:`MAX_CHECKPOINTS` the oldest is dropped."""
        vm = self._vm(name)
        running = self._running[name]
        began = time.monotonic()
        cid = f"cp{running.next_checkpoint}"
        running.next_checkpoint += 1
        await vm.snapshots.checkpoint(_checkpoint_tag(cid))
        running.checkpoints.append(cid)
        out: dict[str, Any] = {"name": name, "id": cid,
                               "seconds": round(time.monotonic() - began, 3)}
        if len(running.checkpoints) > MAX_CHECKPOINTS:
            oldest = running.checkpoints.pop(0)
            await vm.snapshots.drop_checkpoint(_checkpoint_tag(oldest))
            out["dropped"] = oldest
        return out

    async def rollback(self, name: str, checkpoint: str) -> dict[str, Any]:
        """Bring VM ``name`` back to its checkpoint ``checkpoint`` (an id :meth:`checkpoint`
        returned for this VM, nothing else); the checkpoint stays, for another rollback."""
        vm = self._vm(name)
        running = self._running[name]
        if not isinstance(checkpoint, str) or checkpoint not in running.checkpoints:
            have = ", ".join(running.checkpoints) or "none"
            raise SpecError("id", checkpoint, f"not a checkpoint of VM {name} (it has: {have})")
        began = time.monotonic()
        await vm.snapshots.rollback(_checkpoint_tag(checkpoint))
        return {"name": name, "id": checkpoint, "seconds": round(time.monotonic() - began, 3)}

    async def fork(self, name: str, n: int) -> dict[str, Any]:
        """Fork VM ``name`` into ``n`` clones (see :meth:`qemukit.vm.AsyncVM.fork`), each a VM
        of this server: they count against ``max_vms`` and ``max_total_memory_mib``, and end
        when the parent's lifetime ends."""
        count = check_count(n)
        async with self._lock:
            vm = self._vm(name)
            parent = self._running[name]
            lim = self.limits
            if len(self._running) + count > lim.max_vms:
                raise SpecError("n", n, f"{len(self._running)} VMs run and this server runs at "
                                f"most {lim.max_vms} at once (qemukit mcp --max-vms)")
            used = sum(r.vm.spec.memory for r in self._running.values())
            if used + count * vm.spec.memory > lim.max_total_memory_mib:
                raise SpecError("n", n, f"{used} MiB are in use and {count} clones of "
                                f"{vm.spec.memory} MiB would pass {lim.max_total_memory_mib} MiB "
                                "(qemukit mcp --max-total-memory)")
            await self._room_for(count, count * vm.spec.memory)
            began = time.monotonic()
            clones = await vm.fork(count)
            loop = asyncio.get_running_loop()
            for clone in clones:
                running = self._running[clone.name] = _Running(clone, parent.deadline)
                self.ended.pop(clone.name, None)
                running.watcher = loop.create_task(self._watch(clone.name, running))
        return {"name": name, "forks": [c.name for c in clones],
                "seconds": round(time.monotonic() - began, 3),
                "seconds_left": round(max(0.0, parent.deadline - time.monotonic()))}

    def list(self) -> list[dict[str, Any]]:
        """The VMs this server started and runs."""
        now = time.monotonic()
        return [{"name": n, "pid": r.vm.pid, "state": r.vm.state.value,
                 "memory_mib": r.vm.spec.memory, "cpus": r.vm.spec.cpus,
                 "seconds_left": round(max(0.0, r.deadline - now))}
                for n, r in sorted(self._running.items())]

    async def stop(self, name: str) -> dict[str, Any]:
        """Stop VM ``name`` (the shutdown ladder) and forget it."""
        vm = self._vm(name)
        running = self._running.pop(name)
        if running.watcher is not None:
            running.watcher.cancel()
        result = await vm.shutdown(timeout=10)
        return {"name": name, "stopped_by": str(getattr(result, "rung", result))}

    async def stop_all(self) -> None:
        """End every VM this server started (at server exit): they are throwaway, so no ladder."""
        runs, self._running = list(self._running.values()), {}
        for r in runs:
            if r.watcher is not None:
                r.watcher.cancel()
        results = await asyncio.gather(*(r.vm.kill() for r in runs), return_exceptions=True)
        for r, result in zip(runs, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("ending VM %s failed: %s", r.vm.name, result)


def _checkpoint_tag(cid: str) -> str:
    """The snapshot tag of checkpoint id ``cid`` (made by the server, never the client's)."""
    return f"mcp-{cid}"


def _bytes_under(top: Path) -> int:
    total = 0
    for path in top.iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def bounded_script(command: str | Sequence[str], cap: int) -> str:
    """A guest shell script running ``command`` with each of stdout and stderr cut to ``cap``+1
    bytes while it runs (``head -c`` on a FIFO: a writer past it gets SIGPIPE); its exit
    status is the command's. One byte more than the cap tells the caller it was cut."""
    inner = ("exec " + shlex.join(command)) if not isinstance(command, str) else (
        "exec sh -c " + shlex.quote(command))
    keep = cap + 1
    return (
        'd=$(mktemp -d) && mkfifo "$d/o" "$d/e" || exit 125\n'
        f'head -c {keep} <"$d/o" & o=$!\n'
        f'head -c {keep} <"$d/e" >&2 & e=$!\n'
        f'( {inner} ) >"$d/o" 2>"$d/e" </dev/null\n'
        's=$?\n'
        'wait "$o" "$e"\n'
        'rm -rf "$d"\n'
        'exit "$s"\n'
    )


def cap_console_log(path: Path, cap: int, keep: int = _CONSOLE_KEEP) -> bool:
    """Cut a console log over ``cap`` bytes back to its newest ``keep`` bytes; True if cut.

    QEMU appends to the log (``logappend=on``, ``O_APPEND``), so after the
    truncation its writes land at the new end. Bytes it writes between the read
    of the tail and the truncation are lost: this bounds the disk, it is not a
    faithful copy.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= cap:
        return False
    keep = min(keep, cap // 2)
    with open(path, "r+b") as fh:
        fh.seek(max(0, size - keep))
        tail = fh.read(keep)
        fh.truncate(0)
        fh.seek(0)
        fh.write(f"qemukit mcp: console log passed {_size_text(cap)}; older output dropped\n"
                 .encode() + tail)
    return True


def _tool_error(exc: QemukitError) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    return ToolError(str(exc))


def build_server(sandbox: Sandbox) -> Any:
    """The MCP server (``mcp.server.mcpserver.MCPServer``) whose tools drive ``sandbox``."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("qemukit", instructions=(
        "Throwaway Linux VMs (QEMU). start_vm, then exec / read_file / write_file with its name, "
        "then stop_vm. checkpoint_vm and rollback_vm undo what a command did; fork_vm makes "
        "copies of a VM to try alternatives side by side. Every VM is stopped when this server "
        "exits."))
    lim = sandbox.limits

    async def start_vm(image: str | None = None, template: str | None = None,
                       name: str | None = None, memory: str | None = None,
                       cpus: int | None = None, share: str | None = None,
                       forwards: list[str] | None = None) -> dict[str, Any]:
        try:
            return await sandbox.start(image=image, template=template, name=name, memory=memory,
                                       cpus=cpus, share=share, forwards=forwards)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    grants = ", ".join(str(g) for g in sandbox.shares) or "none: no share is possible"
    start_vm.__doc__ = (
        "Start a throwaway VM and wait until it is ready; returns its name.\n\n"
        "image: a built-in image (tiny, the default, or debian); template: a template NAME "
        "instead (built-in: tiny, debian, debian-dev, kernel-test; or one the operator "
        "provides), never a path. memory like \"512M\" (at most "
        f"{lim.max_memory_mib} MiB), cpus (at most {lim.max_cpus}); share "
        "\"HOST_DIR:GUEST_DIR[,ro]\" shares a host directory inside one the operator allowed "
        f"({grants}); forwards [\"HOSTPORT:GUESTPORT\"] forward 127.0.0.1 ports to the guest "
        f"({'allowed' if sandbox.network else 'refused: this server gives VMs no network'}). "
        f"The server stops the VM after {lim.max_lifetime:g} s.")

    async def exec(name: str, command: list[str] | str, timeout: float = 60.0) -> dict[str, Any]:
        try:
            return await sandbox.exec(name, command, timeout)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    exec.__doc__ = (
        "Run a command in VM name: a list runs as argv, a string as shell code.\n\n"
        "Returns exit_status, stdout, stderr; the command is killed after timeout seconds. "
        f"Each of stdout and stderr is cut at {lim.max_output} bytes (stdout_truncated, "
        "stderr_truncated say so).")

    async def read_file(name: str, path: str, encoding: str = "utf-8") -> str:
        if encoding not in ("utf-8", "base64"):
            raise _tool_error(SpecError("encoding", encoding, "must be utf-8 or base64"))
        try:
            data = await sandbox.read_file(name, path)
        except QemukitError as exc:
            raise _tool_error(exc) from exc
        return base64.b64encode(data).decode() if encoding == "base64" else data.decode("utf-8", "replace")

    read_file.__doc__ = (f"The contents of file path in VM name (up to {lim.max_file} bytes, "
                         "checked before the copy), as text (encoding utf-8) or base64.")

    async def write_file(name: str, path: str, content: str, encoding: str = "utf-8") -> str:
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

    write_file.__doc__ = (
        "Write content to file path in VM name (utf-8 text, or base64 with encoding base64).\n\n"
        f"Up to {lim.max_file} bytes; the file is created or replaced with mode 0644.")

    async def list_vms() -> list[dict[str, Any]]:
        """The VMs this server started and still runs."""
        return sandbox.list()

    async def stop_vm(name: str) -> dict[str, Any]:
        """Stop VM name and throw it away."""
        try:
            return await sandbox.stop(name)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    async def checkpoint_vm(name: str) -> dict[str, Any]:
        try:
            return await sandbox.checkpoint(name)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    checkpoint_vm.__doc__ = (
        "Checkpoint VM name: its memory and disks as they are now; returns the id for "
        "rollback_vm.\n\n"
        f"A VM keeps its last {MAX_CHECKPOINTS} checkpoints (a newer one drops the oldest: "
        "'dropped' names it); they count in its disk cap.")

    async def rollback_vm(name: str, id: str) -> dict[str, Any]:  # noqa: A002 (the tool's word)
        try:
            return await sandbox.rollback(name, id)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    rollback_vm.__doc__ = (
        "Bring VM name back to checkpoint id (from checkpoint_vm): memory, processes and "
        "files as they were, in well under a second. The checkpoint stays for another "
        "rollback.")

    async def fork_vm(name: str, n: int) -> dict[str, Any]:
        try:
            return await sandbox.fork(name, n)
        except QemukitError as exc:
            raise _tool_error(exc) from exc

    fork_vm.__doc__ = (
        "Fork VM name into n clones: each starts with its memory, processes and files as they "
        "are now, then goes its own way (its own name, returned in forks; its own disk). "
        f"Clones count against this server's limit of {lim.max_vms} VMs and "
        f"{lim.max_total_memory_mib} MiB, and end when name's lifetime ends; name runs on.")

    tools = (start_vm, exec, read_file, write_file, list_vms, stop_vm, checkpoint_vm,
             rollback_vm, fork_vm)
    params = {fn.__name__: tuple(inspect.signature(fn).parameters) for fn in tools}
    for fn in tools:
        server.tool()(fn)

    # The SDK drops arguments a tool does not take; here they are refused, so a client
    # learns that extra_args, sandbox, kernel, ... are not ignored by chance but refused.
    call_tool = server.call_tool

    async def checked_call_tool(name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        known = params.get(name)
        if known is not None:
            for key in arguments:
                if key not in known:
                    raise ToolError(str(SpecError(key, arguments[key], f"{name} takes only "
                                                  f"{', '.join(known)}")))
        return await call_tool(name, arguments, context)

    server.call_tool = checked_call_tool  # type: ignore[method-assign]
    return server


async def _serve(sandbox: Sandbox) -> None:
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


def serve(limits: Limits | None = None, *, shares: Sequence[ShareGrant] = (),
          template_dirs: Sequence[str | Path] = (), network: bool = False) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin (or SIGTERM); all VMs stop then.

    The arguments are :class:`Sandbox`'s.
    """

    async def main() -> None:
        await _serve(Sandbox(limits, shares=shares, template_dirs=template_dirs,
                             network=network))

    asyncio.run(main())
