"""Turn a :class:`~qemukit.spec.VMSpec` into a QEMU argv: pure, no I/O.

Everything a user supplies reaches QEMU as exactly that value: values that
go through QEMU's option parser are quoted with :func:`quote_opt` (',' is
written ',,'), and options QEMU takes literally (``-kernel``, ``-append``)
are passed as they are. The runtime plumbing (sockets, fds, overlay paths)
comes in as a :class:`Plumbing` so the result depends on its inputs only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import SpecError
from ..spec import Drive, Nic, VMSpec
from .initline import kernel_cmdline
from .netaddr import network_mac, network_nic_id

__all__ = [
    "AGENT_PORT_NAME", "GDB_CHARDEV", "QGA_PORT_NAME", "SEED_DEVICE_ID", "SEED_FILE", "Plumbing",
    "build_argv", "drive_ids", "nic_ids", "quote_opt", "seed_device_args",
]

#: The chardev of QEMU's gdb stub (``spec.gdb``).
GDB_CHARDEV = "gdb0"
AGENT_PORT_NAME = "org.qemukit.agent"
QGA_PORT_NAME = "org.qemu.guest_agent.0"
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def quote_opt(value: str) -> str:
    """Quote a value for QEMU's ``key=value,...`` option parser (',' -> ',,')."""
    if "\x00" in value:
        raise SpecError("value", value, "must not contain a NUL byte")
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Plumbing:
    """Where this VM's sockets, logs and disk files are, decided at launch.

    ``qmp_fd`` is the QEMU end of a socketpair the launcher already holds, so
    the owner's monitor connection cannot race QEMU's start-up. ``drive_files``
    and ``drive_formats`` are the files QEMU opens per drive: the overlay for
    an ``overlay=True`` drive, else the drive's own file. ``drive_backing``
    is, per drive, the backing chain below that file, top first, as (path,
    format) pairs (empty, or left out entirely: no backing file).
    """

    qmp_fd: int | None = None
    qmp_path: str | None = None
    #: QEMU's end of the serial console's connection to the owner (made before QEMU
    #: starts, inherited): the owner reads the console and writes its log.
    console_fd: int | None = None
    console_path: str | None = None
    console_log: str | None = None
    agent_path: str | None = None
    drive_files: tuple[str, ...] = ()
    drive_formats: tuple[str, ...] = ()
    drive_backing: tuple[tuple[tuple[str, str], ...], ...] = ()
    ovmf_code: str | None = None
    ovmf_vars: str | None = None
    #: Per virtiofs share (in spec order, 9p shares skipped): virtiofsd's socket.
    share_sockets: tuple[str, ...] = ()
    #: ``-incoming`` value for a VM restored from saved state (``defer``: fed over QMP).
    incoming: str | None = None
    #: The gdb stub's Unix socket (``spec.gdb`` without ``gdb_port``), in the private
    #: runtime directory.
    gdb_path: str | None = None
    #: Per private network (``spec.networks``, in order): QEMU's end of its connection to
    #: the network's switch, an inherited fd (see :mod:`qemukit._launch.netswitch`).
    network_fds: tuple[int, ...] = ()


def drive_ids(spec: VMSpec) -> list[str]:
    """The device id of each boot drive (the spec's id, else ``disk0``, ``disk1``...)."""
    return [d.id or f"disk{i}" for i, d in enumerate(spec.drives)]


def nic_ids(spec: VMSpec) -> list[str]:
    """The device id of each boot nic (the spec's id, else ``net0``, ``net1``...)."""
    return [n.id or f"net{i}" for i, n in enumerate(spec.nics)]


def _chardev_socket(chardev_id: str, path: str, extra: str = "") -> list[str]:
    return ["-chardev", f"socket,id={chardev_id},path={quote_opt(path)},server=on,wait=off{extra}"]


def _virtio(spec: VMSpec, kind: str) -> str:
    """The virtio device model for the machine's transport (PCI or MMIO)."""
    return _transport(spec, f"virtio-{kind}")


def _transport(spec: VMSpec, model: str) -> str:
    return spec.arch_info.device(model, spec.machine)


def _format_node(node: str, fmt: str, file_node: str, backing: str | None,
                 read_only: bool) -> list[str]:
    """One format node. A qcow2 always says what its backing is (a node, or null).

    QEMU would otherwise open whatever file the image's header names. The
    node is written in JSON, since the dotted syntax has no way to say null.
    """
    if fmt == "raw":
        ro = ",read-only=on" if read_only else ""
        return ["-blockdev", f"driver=raw,node-name={node},file={file_node}{ro}"]
    opts: dict[str, object] = {"driver": fmt, "node-name": node, "file": file_node,
                               "backing": backing}
    if read_only:
        opts["read-only"] = True
    return ["-blockdev", json.dumps(opts, separators=(",", ":"))]


def _layer_args(node: str, path: str, fmt: str, backing: str | None, read_only: bool) -> list[str]:
    ro = ",read-only=on" if read_only else ""
    return ["-blockdev", f"driver=file,node-name={node}-file,filename={quote_opt(path)}{ro}",
            *_format_node(f"{node}-fmt", fmt, f"{node}-file", backing, read_only)]


def _drive_args(spec: VMSpec, plumbing: Plumbing) -> list[str]:
    """Each drive's explicit block graph: its backing chain bottom up, then its own nodes.

    Backing layers are ``<id>-b<N>-file``/``-fmt`` (N from the top), always
    read-only; the drive's own nodes are ``<id>-file``/``<id>-fmt``.
    """
    count = len(spec.drives)
    chains = plumbing.drive_backing or ((),) * count
    if len(plumbing.drive_files) != count or len(plumbing.drive_formats) != count or len(
        chains
    ) != count:
        raise SpecError("drives", spec.drives, "every drive needs a resolved file and format")
    args: list[str] = []
    scsi_added = False
    for drive, dev_id, path, fmt, chain in zip(
        spec.drives, drive_ids(spec), plumbing.drive_files, plumbing.drive_formats, chains,
        strict=True,
    ):
        layers = [(dev_id, path, fmt, drive.read_only)] + [
            (f"{dev_id}-b{depth}", layer_path, layer_fmt, True)
            for depth, (layer_path, layer_fmt) in enumerate(chain)
        ]
        for index in range(len(layers) - 1, -1, -1):
            node, layer_path, layer_fmt, read_only = layers[index]
            below = f"{layers[index + 1][0]}-fmt" if index + 1 < len(layers) else None
            if below is not None and layer_fmt != "qcow2":
                raise SpecError("drive.backing", chain, f"{layer_path} is {layer_fmt}, and only "
                                "a qcow2 has a backing file")
            args += _layer_args(node, layer_path, layer_fmt, below, read_only)
        args += _drive_device(spec, drive, dev_id, scsi_added)
        scsi_added = scsi_added or drive.interface == "virtio-scsi"
    return args


def _drive_device(spec: VMSpec, drive: Drive, dev_id: str, scsi_added: bool) -> list[str]:
    if drive.interface == "virtio-blk":
        return ["-device", f"{_virtio(spec, 'blk')},drive={dev_id}-fmt,id={dev_id}"]
    if drive.interface == "virtio-scsi":
        ctrl = [] if scsi_added else ["-device", f"{_virtio(spec, 'scsi')},id=scsi0"]
        return ctrl + ["-device", f"scsi-hd,bus=scsi0.0,drive={dev_id}-fmt,id={dev_id}"]
    return ["-device", f"nvme,drive={dev_id}-fmt,id={dev_id},serial={dev_id}"]


def _share_args(spec: VMSpec, plumbing: Plumbing) -> list[str]:
    """9p shares need nothing but QEMU; virtiofs needs shared guest RAM and a socket."""
    args: list[str] = []
    shares = spec.all_shares
    virtiofs = [sh for sh in shares if sh.transport == "virtiofs"]
    if len(plumbing.share_sockets) != len(virtiofs):
        raise SpecError("shares", shares, "every virtiofs share needs a virtiofsd socket")
    if virtiofs:
        # vhost-user devices map guest RAM into virtiofsd: it must be a shared memfd
        # (made the machine's RAM with memory-backend=, which microvm honours too).
        args += ["-object", f"memory-backend-memfd,id=ram0,size={spec.memory}M,share=on"]
        if spec.machine == "microvm":
            # vhost-user needs virtio 1.0; microvm's virtio-mmio defaults to legacy.
            args += ["-global", "virtio-mmio.force-legacy=false"]
    sockets = iter(plumbing.share_sockets)
    for sh in shares:
        if sh.transport == "9p":
            ro = ",readonly=on" if sh.read_only else ""
            # multidevs=remap: a shared tree that spans file systems (the host's root of
            # --rootfs host) would otherwise show the guest equal inode numbers for
            # different files, which breaks tools that compare them (tar, find, git).
            args += ["-fsdev", f"local,id={sh.tag}-fs,path={quote_opt(str(sh.host_path))},"
                               f"security_model=none,multidevs=remap{ro}",
                     "-device", f"{_virtio(spec, '9p')},fsdev={sh.tag}-fs,mount_tag={sh.tag}"]
        else:
            args += ["-chardev", f"socket,id={sh.tag}-vfs,path={quote_opt(next(sockets))}",
                     "-device", f"{_transport(spec, 'vhost-user-fs')},chardev={sh.tag}-vfs,"
                                f"tag={sh.tag}"]
    return args


def _nic_args(spec: VMSpec) -> list[str]:
    args: list[str] = []
    for nic, dev_id in zip(spec.nics, nic_ids(spec), strict=True):
        args += ["-netdev", _netdev(nic, f"{dev_id}-backend")]
        mac = f",mac={nic.mac}" if nic.mac else ""
        args += ["-device", f"{_virtio(spec, 'net')},netdev={dev_id}-backend,id={dev_id}{mac}"]
    return args


def _network_args(spec: VMSpec, plumbing: Plumbing, vm_name: str) -> list[str]:
    """One NIC per private network, on the switch connection QEMU inherits (``stream``, fd)."""
    if len(plumbing.network_fds) != len(spec.networks):
        raise SpecError("networks", list(spec.networks), "every network needs its switch "
                        "connection")
    args: list[str] = []
    for network, fd in zip(spec.networks, plumbing.network_fds, strict=True):
        dev_id = network_nic_id(network)
        args += ["-netdev", f"stream,id={dev_id}-backend,server=off,addr.type=fd,addr.str={fd}",
                 "-device", f"{_virtio(spec, 'net')},netdev={dev_id}-backend,id={dev_id},"
                            f"mac={network_mac(network, vm_name)}"]
    return args


def _netdev(nic: Nic, backend_id: str) -> str:
    if nic.kind == "tap":
        assert nic.ifname is not None
        return f"tap,id={backend_id},ifname={quote_opt(nic.ifname)},script=no,downscript=no"
    fwds = "".join(
        f",hostfwd={fw.protocol}:{fw.host_addr}:{fw.host_port}-:{fw.guest_port}"
        for fw in nic.forwards
    )
    return f"user,id={backend_id}{fwds}"


def build_argv(
    spec: VMSpec,
    *,
    qemu: str,
    accel: str,
    plumbing: Plumbing,
    sandbox: bool = False,
    name: str | None = None,
    cpu: str | None = None,
    run_with: bool = False,
    tsc_khz: int | None = None,
) -> list[str]:
    """The full QEMU argv for ``spec`` with the accelerator already decided.

    ``accel`` is ``kvm`` or ``tcg`` (``auto`` is resolved by the host probe
    first); ``sandbox`` adds QEMU's seccomp sandbox and should be true only
    when the binary supports it; ``cpu`` is the host's preferred CPU model
    for that accelerator, used when the spec names none. ``run_with`` says
    the binary takes ``-run-with user=`` (QEMU >= 9.1) rather than ``-runas``.
    ``tsc_khz`` is the host's TSC rate: a kernel on microvm (no PIT to
    calibrate against) gets ``tsc_early_khz=`` so it cannot hang at boot.
    """
    if accel not in ("kvm", "tcg"):
        raise SpecError("accel", accel, "must be resolved to kvm or tcg before building argv")
    vm_name = name or spec.name or "vm"
    info = spec.arch_info
    # A TCG code buffer size needs -accel (QEMU refuses it together with -machine accel=).
    accel_opts = (["-accel", f"tcg,tb-size={spec.tb_size}"]
                  if accel == "tcg" and spec.tb_size is not None else [])
    machine = spec.machine if accel_opts else f"{spec.machine},accel={accel}"
    if info.machine_opts:
        machine += f",{info.machine_opts}"
    if accel == "kvm" and info.kvm_machine_opts:
        machine += f",{info.kvm_machine_opts}"
    if any(sh.transport == "virtiofs" for sh in spec.all_shares):
        machine += ",memory-backend=ram0"
    if spec.firmware == "ovmf":
        if not (plumbing.ovmf_code and plumbing.ovmf_vars):
            raise SpecError("firmware", "ovmf", "OVMF firmware files were not resolved")
        machine += ",pflash0=ovmf-code,pflash1=ovmf-vars"
    argv = [qemu, "-name", quote_opt(vm_name), "-machine", machine, *accel_opts]
    cpu_model = spec.cpu or cpu or ("host" if accel == "kvm" else info.tcg_cpu)
    if cpu_model:
        argv += ["-cpu", cpu_model]
    smp = str(spec.cpus) + (f",maxcpus={spec.max_cpus}" if spec.max_cpus else "")
    mem = f"{spec.memory}M"
    if spec.max_memory is not None:
        mem += f",slots={spec.slots},maxmem={spec.max_memory}M"
    argv += ["-smp", smp, "-m", mem, "-nodefaults", "-no-user-config", "-display", "none"]
    if info.no_vmcoreinfo is None:
        # Where the guest's fw_cfg driver gives it the kernel's VMCOREINFO, QEMU writes
        # it into dumps: without it drgn and crash cannot open them (see arch.py).
        argv += ["-device", "vmcoreinfo"]
    if spec.no_reboot:
        argv.append("-no-reboot")
    if sandbox:
        # -runas calls setgid/setuid after the filter is installed, so set*id must be
        # allowed; once root has dropped all its ids, set*id cannot regain them anyway.
        opts = SANDBOX_OPTS
        if spec.run_as:
            opts = opts.replace("elevateprivileges=deny", "elevateprivileges=allow")
        argv += ["-sandbox", opts]
    if spec.run_as:
        argv += ["-run-with", f"user={spec.run_as}"] if run_with else ["-runas", spec.run_as]
    if spec.qmp_tcp_port is not None:
        argv += ["-chardev", f"socket,id=qmp-tcp,host=127.0.0.1,port={spec.qmp_tcp_port},"
                             "server=on,wait=off",
                 "-mon", "chardev=qmp-tcp,mode=control"]
    if spec.gdb:
        # The stub reads and writes guest memory and passes gdb's `monitor` packets to
        # the human monitor: a Unix socket in the owner's 0700 runtime directory by
        # default; TCP (loopback, reachable by every local user) only when asked.
        if spec.gdb_port is not None:
            where = f"host=127.0.0.1,port={spec.gdb_port}"
        elif plumbing.gdb_path:
            where = f"path={quote_opt(plumbing.gdb_path)}"
        else:
            raise SpecError("gdb", True, "the gdb stub's socket path was not resolved")
        argv += ["-chardev", f"socket,id={GDB_CHARDEV},{where},server=on,wait=off",
                 "-gdb", f"chardev:{GDB_CHARDEV}"]
        if spec.gdb_wait:
            argv.append("-S")
    if plumbing.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp-owner,fd={plumbing.qmp_fd}"]
        argv += ["-mon", "chardev=qmp-owner,mode=control"]
    if plumbing.qmp_path:
        argv += _chardev_socket("qmp-shared", plumbing.qmp_path)
        argv += ["-mon", "chardev=qmp-shared,mode=control"]
    if spec.serial:
        if plumbing.console_fd is not None:
            # Connected to the owner before QEMU starts, so the owner reads every byte
            # and writes the log itself. QEMU's logfile= logs a byte twice when the
            # reader is slow (a write that failed with EAGAIN is logged, then logged
            # again when the UART retries it); a detached VM, read by nobody, keeps it.
            argv += ["-chardev", f"socket,id=console0,fd={plumbing.console_fd}"]
            argv += ["-serial", "chardev:console0"]
        elif plumbing.console_path:
            log = ""
            if plumbing.console_log:
                log = f",logfile={quote_opt(plumbing.console_log)},logappend=on"
            argv += _chardev_socket("console0", plumbing.console_path, log)
            argv += ["-serial", "chardev:console0"]
        elif plumbing.console_log:
            argv += ["-chardev", f"file,id=console0,path={quote_opt(plumbing.console_log)}"]
            argv += ["-serial", "chardev:console0"]
    if spec.firmware == "ovmf":
        assert plumbing.ovmf_code and plumbing.ovmf_vars
        argv += [
            "-blockdev",
            f"driver=file,node-name=ovmf-code,filename={quote_opt(plumbing.ovmf_code)},read-only=on",
            "-blockdev",
            f"driver=file,node-name=ovmf-vars,filename={quote_opt(plumbing.ovmf_vars)}",
        ]
    if spec.kernel is not None:
        # -kernel, -initrd and -append are stored verbatim by QEMU: no ',,' quoting.
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        append = kernel_cmdline(spec, tsc_khz)
        if append is not None:
            argv += ["-append", append]
    argv += _share_args(spec, plumbing)
    if spec.machine in ("q35", "virt") and info.hotplug_bus:
        for i in range(spec.hotplug_ports):
            argv += ["-device", f"pcie-root-port,id=hp{i},bus={info.hotplug_bus},chassis={i + 1}"]
    argv += _drive_args(spec, plumbing)
    argv += _nic_args(spec)
    argv += _network_args(spec, plumbing, vm_name)
    if spec.agent != "none" and plumbing.agent_path:
        port_name = QGA_PORT_NAME if spec.agent == "qga" else AGENT_PORT_NAME
        argv += ["-device", f"{_virtio(spec, 'serial')},id=vser0"]
        argv += _chardev_socket("agent0", plumbing.agent_path)
        argv += [
            "-device",
            f"virtserialport,bus=vser0.0,chardev=agent0,name={port_name},id=agent0-port",
        ]
    if plumbing.incoming:
        argv += ["-incoming", plumbing.incoming]
    argv += list(spec.extra_args)
    return argv


# -- the cloud-init seed CD ---------------------------------------------------------------

#: The seed CD's device id, and its file in the runtime directory.
SEED_DEVICE_ID = "cidata0"
SEED_FILE = "seed.iso"


def seed_device_args(spec: VMSpec, iso: str) -> list[str]:
    """QEMU arguments attaching the seed ISO as a read-only SCSI CD (pure).

    The cloud kernel has no AHCI driver, so on q35 an ``ide-cd`` would never
    be seen (and arm's virt has no IDE at all): the CD goes on virtio-scsi,
    sharing the spec's controller (``scsi0``) when it has SCSI disks, else on
    a controller of its own.
    """
    if spec.machine == "microvm":
        raise SpecError("cloud_init", "set", "microvm has no PCI bus for the seed CD")
    node = SEED_DEVICE_ID.rstrip("0")
    controller: list[str] = []
    bus = "scsi0.0"
    if not any(d.interface == "virtio-scsi" for d in spec.drives):
        controller = ["-device", f"{_virtio(spec, 'scsi')},id=scsi1"]
        bus = "scsi1.0"
    return [
        "-blockdev", f"driver=file,node-name={node}-file,filename={quote_opt(iso)},read-only=on",
        "-blockdev", f"driver=raw,node-name={node}-fmt,file={node}-file,read-only=on",
        *controller,
        "-device", f"scsi-cd,bus={bus},drive={node}-fmt,id={SEED_DEVICE_ID}",
    ]
