"""One resolver: what a front end asks for becomes the spec, the machine and the warm decision.

Every front end (``qemukit run``, ``start`` and ``cmdline``, :func:`qemukit.kernel.run_kernel`,
matrix jobs on this host or a Dask worker, the pytest plugin, ``qemukit mcp``) describes
the VM it wants as a :class:`Request` and calls :func:`resolve`, so the same request boots
the same machine everywhere, and ``qemukit cmdline`` prints what ``run`` would spawn.

A request names where the description comes from (a built-in or imported ``image``, a
``spec_file``, a ``kernel`` to boot with the tiny initramfs, or a ready ``spec``), the
``arch``, field ``overrides``, ``warm`` (None: the default), and its ``purpose``:

``command``
    one command, then the VM stops (``run -- CMD``, ``run_kernel``, a matrix job);
``interactive``
    a VM used while it runs: the console, a test's fixture, an MCP client's VM;
``detached``
    a VM left running in the background (``run --detach``, ``start``).

The :class:`Resolution` holds the spec to boot and two decisions with their reasons:
the machine (:class:`MachineChoice`; a kernel request with no machine named gets
microvm when nothing in the run needs q35, see :func:`kernel_run_machine`) and the warm
start (:class:`WarmChoice`). Everything that can be wrong about the request is a
:class:`~qemukit.errors.SpecError` or :class:`~qemukit.errors.HostError` raised here,
before any process starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import images, kconfig
from .arch import ARCHES, DEFAULT_ARCH
from .errors import HostError, SpecError
from .spec import CloudInit, VMSpec

if TYPE_CHECKING:
    from .vm import VM

__all__ = ["Detached", "MachineChoice", "Purpose", "Request", "Resolution", "WarmChoice",
           "job_request", "kernel_run_machine", "resolve", "start_detached"]

Purpose = Literal["command", "interactive", "detached"]
_PURPOSES = ("command", "interactive", "detached")
_LISTS = ("drives", "nics", "networks", "shares", "extra_args")


@dataclass(frozen=True)
class MachineChoice:
    """The machine a VM boots, and why (``run -v`` says it)."""

    machine: str
    reason: str

    def describe(self) -> str:
        """One line: ``machine microvm: <why>``."""
        return f"machine {self.machine}: {self.reason}"


@dataclass(frozen=True)
class WarmChoice:
    """Whether the start is to be warm (restore a saved ready state), and why.

    ``warm`` is what the spec asks; a spec that cannot start warm still boots
    cold at its start (:func:`qemukit.warm.warm_refusal`), and ``refusal`` says
    that ahead of time.
    """

    warm: bool
    reason: str
    refusal: str | None = None

    def describe(self) -> str:
        """One line: ``warm: <why>`` or ``cold: <why>``."""
        if self.warm and self.refusal is not None:
            return f"warm asked ({self.reason}), but it boots cold: {self.refusal}"
        return f"{'warm' if self.warm else 'cold'}: {self.reason}"


@dataclass(frozen=True)
class Request:
    """What a front end asks for (see the module's text). Exactly one source at most:
    ``image``, ``spec_file``, ``kernel`` or ``spec`` (none: a bare default spec, or
    the tiny image for a foreign ``arch``).

    ``overrides`` are :class:`~qemukit.spec.VMSpec` fields (``machine`` among them
    is taken at its word; ``kernel`` and ``initrd`` go with a kernel request);
    ``appended`` adds items to the base's list fields (``drives``, ``nics``,
    ``networks``, ``shares``, ``extra_args``: ``--disk`` adds a disk to the image's).
    ``append_extra`` is added to the base's kernel command line (``run_kernel``'s
    ``append``), where an ``append`` override replaces it. ``modules`` are
    appended to the initramfs at the start (a one-shot kernel run with them boots
    cold). ``suite`` and ``packages`` pick a debian build. ``seed`` sets
    :class:`~qemukit.spec.CloudInit` fields on the base's seed (adding one:
    ``run --user-data``, ``--ssh-key``). ``build`` builds a
    missing built-in image first (else a :class:`~qemukit.errors.HostError` says
    how); ``record=False`` only previews (``cmdline``): nothing is noted.
    """

    image: str | None = None
    spec_file: str | os.PathLike[str] | None = None
    kernel: str | os.PathLike[str] | None = None
    spec: VMSpec | None = None
    arch: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    appended: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    append_extra: str | None = None
    warm: bool | None = None
    purpose: Purpose = "command"
    modules: str | os.PathLike[str] | None = None
    suite: str | None = None
    packages: tuple[str, ...] = ()
    seed: Mapping[str, str] = field(default_factory=dict)
    build: bool = False
    record: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("image", "spec_file", "kernel", "spec") if getattr(self, k)]
        if len(given) > 1:
            raise SpecError(given[1], getattr(self, given[1]),
                            f"give one of image, spec file, kernel or spec, not {given[0]} too")
        if self.purpose not in _PURPOSES:
            raise SpecError("purpose", self.purpose, f"must be one of {', '.join(_PURPOSES)}")
        if self.arch is not None and self.arch not in ARCHES:
            raise SpecError("arch", self.arch, f"must be one of {', '.join(ARCHES)}")
        if self.warm is not None and not isinstance(self.warm, bool):
            raise SpecError("warm", self.warm, "must be true or false")
        object.__setattr__(self, "overrides", dict(self.overrides))
        object.__setattr__(self, "appended", {k: tuple(v) for k, v in self.appended.items()})
        for key in self.appended:
            if key not in _LISTS:
                raise SpecError(key, self.appended[key], f"only {', '.join(_LISTS)} are added to")
        object.__setattr__(self, "packages", tuple(self.packages))
        object.__setattr__(self, "seed", dict(self.seed))

    @property
    def kernel_run(self) -> bool:
        """True for a kernel booted with the tiny initramfs: the machine is chosen for it."""
        return self.kernel is not None


@dataclass(frozen=True)
class Resolution:
    """A request resolved: the spec to boot, its machine and its warm start, with reasons."""

    request: Request
    spec: VMSpec
    machine: MachineChoice
    warm: WarmChoice

    def describe(self) -> list[str]:
        """The decisions, a line each (``run -v`` prints them)."""
        return [self.machine.describe(), self.warm.describe()]

    def replace_spec(self, spec: VMSpec) -> Resolution:
        """This resolution with ``spec`` changed by a front end's own option (``run --keep``)."""
        return dataclasses.replace(self, spec=spec)


def _check_machine(machine: object, arch: str) -> None:
    """A machine named in the request must be one of the arch's (no silent mapping)."""
    if machine is not None and machine not in ARCHES[arch].machines:
        raise SpecError("machine", machine, f"not a machine for arch {arch}; "
                        f"one of {', '.join(ARCHES[arch].machines)}")


def _kernel_arch(kernel: str | os.PathLike[str], arch: str | None) -> str | None:
    """The architecture of a kernel request: a built tree's image says it."""
    if os.path.isdir(kernel):
        return kconfig.find_tree(os.fspath(kernel), arch).arch
    return arch  # a missing file is refused once the overrides are checked (resolve)


def _tiny(arch: str, build: bool, **fields: Any) -> VMSpec:
    if build and not (fields.get("kernel") and fields.get("initrd")) and (
            images.find_image("tiny", arch) is None):
        images.build("tiny", arch=arch)
    return images.spec("tiny", arch=arch, **fields)


def _base(request: Request) -> tuple[VMSpec, str]:
    """The spec the request starts from, and what it is (for the reasons)."""
    arch = request.arch
    over = request.overrides
    if request.spec_file is not None:
        from .templates import load_spec

        spec = load_spec(os.fspath(request.spec_file))  # its base chain, a built-in image if it names one
        if arch is not None and arch != spec.arch:
            spec = spec.replace(arch=arch, machine=ARCHES[arch].default_machine)
        return spec, f"the spec file {os.fspath(request.spec_file)}"
    if request.spec is not None:
        spec = request.spec
        if arch is not None and arch != spec.arch:
            spec = spec.replace(arch=arch, machine=ARCHES[arch].default_machine)
        return spec, "the given spec"
    if request.image is not None:
        by_arch = {"arch": arch} if arch is not None else {}
        own = {k: over[k] for k in ("kernel", "initrd") if over.get(k) is not None}
        try:
            spec = images.spec(request.image, suite=request.suite, packages=request.packages,
                               **by_arch, **own)
        except HostError:
            if not (request.build and request.image in images.NAMES):
                raise
            images.build(request.image, arch=arch or DEFAULT_ARCH, suite=request.suite,
                         packages=request.packages)  # not built yet: build it, once
            spec = images.spec(request.image, suite=request.suite, packages=request.packages,
                               **by_arch, **own)
        return spec, f"the {request.image} image"
    if request.kernel is not None:
        chosen = _kernel_arch(request.kernel, arch) or DEFAULT_ARCH
        fields: dict[str, Any] = {"kernel": os.fspath(request.kernel)}
        if over.get("initrd") is not None:  # a kernel and an initrd of one's own need no tiny
            fields["initrd"] = os.fspath(over["initrd"])
        spec = _tiny(chosen, request.build, **fields)
        if request.append_extra:
            spec = spec.replace(append=f"{spec.append or ''} {request.append_extra}".strip())
        return spec, "a kernel with the tiny initramfs"
    if arch is not None and not ARCHES[arch].boots_from_disk:
        return _tiny(arch, request.build), f"the tiny image for {arch}"
    return (VMSpec() if arch is None else VMSpec().replace(arch=arch)), "the default spec"


def resolve(request: Request) -> Resolution:
    """Resolve ``request`` (see the module's text): the spec, the machine and the warm start.

    Reads files (the spec file, the image cache, a kernel's config, the record of
    kernels run here, unless ``record=False``) but starts nothing.
    """
    over = dict(request.overrides)
    if request.arch is not None:
        _check_machine(over.get("machine"), request.arch)  # before any image is looked up
    spec, source = _base(request)
    _check_machine(over.get("machine"), spec.arch)
    if request.kernel_run:
        over.pop("kernel", None)  # the request's kernel is the one
    if request.append_extra and "append" not in over and not request.kernel_run:
        over["append"] = f"{spec.append or ''} {request.append_extra}".strip()
    for key, items in request.appended.items():
        over[key] = tuple(over.get(key, getattr(spec, key))) + items
    if request.seed:
        over["cloud_init"] = dataclasses.replace(
            over.get("cloud_init") or spec.cloud_init or CloudInit(), **request.seed)
    if over:
        spec = spec.replace(**over)
    if request.kernel_run and not os.path.exists(request.kernel or ""):
        raise SpecError("kernel", os.fspath(request.kernel or ""), "no such file or kernel tree")
    if spec.host_root is not None:  # every mistake about it now, not at the start
        from .rootfs import resolve_host_root

        spec = resolve_host_root(spec)
    if spec.forward_auto and "forward_auto" in over and request.purpose != "detached":
        raise SpecError("forward_auto", True, "needs a detached VM (run --detach, start): "
                        "the watcher that forwards outlives the command")
    machine = _machine(request, spec, source, "machine" in over)
    if machine.machine != spec.machine:
        spec = spec.replace(machine=machine.machine)
    warm = _warm(request, spec, machine)
    if warm.warm != spec.warm:
        spec = spec.replace(warm=warm.warm)
    return Resolution(request, spec, machine, warm)


def _machine(request: Request, spec: VMSpec, source: str, named: bool) -> MachineChoice:
    if named:
        return MachineChoice(spec.machine, "named in the request (--machine)")
    if not request.kernel_run:
        return MachineChoice(spec.machine, f"the machine of {source}")
    from .host import tsc_khz
    from .warm import note_kernel_run, warm_refusal

    one_shot = request.purpose == "command"
    ran_before = (one_shot and request.warm is None and request.modules is None
                  and warm_refusal(spec.replace(machine=spec.arch_info.default_machine)) is None
                  and note_kernel_run(spec, record=request.record))
    return kernel_run_machine(spec, one_shot=one_shot, warm_asked=request.warm is True,
                              tsc_khz=tsc_khz(), ran_before=ran_before)


def _warm(request: Request, spec: VMSpec, machine: MachineChoice) -> WarmChoice:
    from .warm import warm_refusal

    if request.warm is not None:
        choice = WarmChoice(request.warm, "asked for (--warm)" if request.warm
                            else "asked for (--cold)")
    elif request.kernel_run and machine.machine == "microvm":
        choice = WarmChoice(False, "microvm cannot start warm, and a kernel's first run "
                            "gains nothing from a saved state")
    elif spec.warm:
        choice = WarmChoice(True, "the spec says warm = true")
    elif request.spec_file is None and request.spec is None and (
            request.image is not None or request.kernel is not None):
        choice = WarmChoice(True, "the default for an image or a kernel: a saved ready "
                            "state is restored (booted and saved once)")
    else:
        choice = WarmChoice(False, "the spec says warm = false (the default for a spec)")
    if choice.warm:
        refusal = warm_refusal(spec)
        if refusal is None and request.modules is not None:
            refusal = "its modules are appended to the initramfs per VM, so it boots"
        if refusal is not None:
            return dataclasses.replace(choice, refusal=refusal)
    return choice


def kernel_run_machine(spec: VMSpec, *, one_shot: bool, warm_asked: bool,
                       tsc_khz: int | None, ran_before: bool = False) -> MachineChoice:
    """The machine for a kernel run when none is named (pure: no I/O but reading the
    kernel's config file).

    microvm, as virtme-ng picks, when nothing in the run needs what only q35 has
    (PCIe slots and ACPI hotplug, vmgenid for a warm restore, OVMF, the seed CD's
    PCI bus, disks other than virtio-blk) and the kernel is known to drive it:
    its config (a tree's ``.config``, ``config-<release>`` beside the image)
    has ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``. ``one_shot`` is a run of one
    command that nothing else will reach for later (``-- CMD``, not ``--detach``
    or the console); ``warm_asked`` an explicit ``--warm``; ``tsc_khz`` the
    host's TSC rate, without which a kernel on microvm cannot calibrate its clock
    and hangs in about 4 boots of 10; ``ran_before`` that this kernel ran here
    before (:func:`qemukit.warm.note_kernel_run`): a repeated kernel gets q35 and
    a warm state, so its later runs are restores. Otherwise q35, saying which of
    these it was.
    """
    info = spec.arch_info
    if "microvm" not in info.machines:
        return MachineChoice(spec.machine, f"the {spec.arch} machine qemukit drives")
    needs: str | None = None
    if not one_shot:
        needs = ("a VM without a command (--detach, the console) may be hotplugged or "
                 "snapshotted while it runs")
    elif warm_asked:
        needs = "--warm restores a saved state, whose clones need q35's vmgenid device"
    elif spec.max_cpus is not None or spec.max_memory is not None:
        needs = "CPU or memory hotplug needs q35's ACPI hotplug"
    elif spec.firmware != "seabios":
        needs = f"firmware {spec.firmware} boots on q35"
    elif spec.cloud_init is not None:
        needs = "the cloud-init seed CD needs a PCI bus"
    elif any(d.interface != "virtio-blk" for d in spec.drives):
        needs = "disks other than virtio-blk need q35's PCI bus"
    elif spec.extra_args:
        needs = "--qemu-arg may name devices of q35's PCI bus"
    elif ran_before:
        needs = ("this kernel ran here before (same image, initrd and command line): its runs "
                 "start warm from now on, and a warm clone needs q35's vmgenid device")
    elif tsc_khz is None:
        needs = ("the host's TSC rate is unknown, and without tsc_early_khz= a kernel on "
                 "microvm hangs in about 4 boots of 10")
    if needs is None and spec.kernel is not None:
        config = kconfig.kernel_config(spec.kernel)
        wanted = ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES")
        if config is None:
            needs = (f"the kernel's config is not known (no .config or config-<release> beside "
                     f"it), so nothing shows it has {wanted[1]}, which microvm needs")
        else:
            settings = kconfig.read_config(config)
            lacking = [o for o in wanted if settings.get(o) not in ("y", "m")]
            if lacking:
                needs = f"its config {config} lacks {', '.join(lacking)}, which microvm needs"
    if needs is not None:
        return MachineChoice(info.default_machine, needs)
    return MachineChoice("microvm", "nothing in this run needs q35's PCIe hotplug or ACPI "
                         "(as virtme-ng; --machine q35 for the other)")


@dataclass(frozen=True)
class Detached:
    """A VM started in the background: its name, pid, accelerator and warm start."""

    name: str
    pid: int | None
    accel: str | None
    warm: bool | None
    gdb: str | None
    #: The pid of its watcher (caps the console log; forwards ports for ``forward_auto``).
    watcher: int


def start_detached(resolution: Resolution, *, timeout: float = 300.0,
                   wait_for: Literal["qmp", "agent", "ssh"] = "qmp",
                   on_started: Any = None) -> Detached:
    """Start the resolved VM to outlive this process, wait for ``wait_for``, let go of it.

    The library, not a front end, starts its watcher
    (:func:`qemukit.ports.start_watcher`): it keeps the console log capped and,
    when the spec asks (``forward_auto``), forwards each port the guest listens
    on. A failure before the VM is let go kills it. ``on_started(vm)`` is called
    once it runs (e.g. to say which accelerator).
    """
    from .ports import start_watcher
    from .vm import VM

    # A tree's modules (or modules=) go into an initramfs in the VM's runtime directory,
    # which stays as long as the VM does.
    vm: VM = VM(resolution.spec, die_with_parent=False, boot_timeout=timeout,
                modules=resolution.request.modules)
    try:
        vm.start()
        if wait_for == "agent" or (wait_for == "qmp" and resolution.spec.networks):
            # A private network's address is written into the guest once its agent answers.
            vm.wait_ready(timeout)
        elif wait_for == "ssh":
            vm.wait_ssh(timeout)
        if on_started is not None:
            on_started(vm)
    except BaseException:
        # Nobody would own a VM left running here: end it, then report why.
        if vm.state.value == "running":
            vm.kill()
        raise
    name, pid, accel, warm = vm.name, vm.pid, vm.accel, vm.warm_start
    gdb = vm.gdb_address() if resolution.spec.gdb else None
    vm.detach()
    watcher = start_watcher(name, forward=bool(resolution.spec.forward_auto))
    return Detached(name, pid, accel.accel if accel else None,
                    warm.warm if warm is not None else None, gdb, watcher)


def job_request(*, image: str | None, vm: Mapping[str, Any], modules: str | None = None,
                build: bool = True) -> Request:
    """The request of a matrix job: its ``image`` (or its ``kernel``, booted with the tiny
    initramfs, as ``run --kernel`` and :func:`~qemukit.kernel.run_kernel` do) and its VM
    keys; one command; a missing built-in image is built first."""
    fields = dict(vm)
    warm = fields.pop("warm", None)
    arch = fields.pop("arch", None)
    kernel = fields.pop("kernel", None) if image is None else None
    return Request(image=image, kernel=kernel, arch=arch, overrides=fields, warm=warm,
                   purpose="command", modules=modules, build=build)
