"""The host's root as the guest's: ``qemukit run --rootfs host``.

A kernel developer runs the tests they have on the host, with the host's
programs and libraries, against the kernel they just built, without making an
image. The tiny image does it: the host's ``/`` is shared read-only, the
guest's init lays an overlay over it whose changes stay in guest memory, and
the agent runs commands (and the console its shell) inside that root. A
directory given with ``rw`` is shared writable at its own path on top, so a
build or a test's output lands on the host. The command starts in the caller's
working directory.

How read-only: on the host, whatever the guest kernel does (its root may
mount the share again read-write). Over 9p (``readonly=on``) QEMU itself
refuses every write; that needs a kernel with 9p, which Debian's cloud kernels
(the x86_64 tiny image's) lack. There the root goes over virtiofs, and
virtiofsd serves it from a read-only bind mount in a mount namespace of its
own (QEMU 7.2's C virtiofsd has no read-only export; see
:func:`qemukit.host.virtiofsd_argv`), so a write fails with EROFS at the
host. The guest's init mounts it read-only as well. The ``rw`` directories
are served under the share guard: no setuid or setgid file and no device
node can be made on the host through them.

It is a part of a spec (:class:`~qemukit.spec.HostRoot`, ``host_root = { rw =
["out"] }`` in a spec file), resolved at every start (:func:`resolve_host_root`);
the guest learns of it from the kernel command line, written by
:mod:`qemukit._launch.initline` alone; a command starts in a directory with
:func:`in_directory`. Everything else is the tiny image's (``images/tiny/init``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from .errors import SpecError
from .spec import HOST_ROOT_MOUNT, HOST_ROOT_TAG, HostRoot, VMSpec

__all__ = ["GUEST_MOUNT", "HOST_ROOT_TAG", "host_root", "in_directory", "resolve_host_root",
           "root_transport"]

#: Where the guest mounts the host's root before laying the overlay over it.
GUEST_MOUNT = HOST_ROOT_MOUNT


def root_transport(spec: VMSpec) -> Literal["9p", "virtiofs"]:
    """9p when the guest has it (read-only enforced by QEMU), else virtiofs.

    The tiny image's own kernel: known from its manifest (the modules in its
    initramfs). Another kernel (``--kernel``, a tree): from its config where it
    can be found (``CONFIG_9P_FS``, else ``CONFIG_VIRTIO_FS``), else taken to
    have 9p (``qemukit kconfig`` enables both).
    """
    from .kconfig import kernel_config, read_config

    if spec.initrd is not None and spec.kernel is not None and (
            Path(spec.kernel).parent == Path(spec.initrd).parent):
        manifest = Path(spec.initrd).parent / "manifest.json"
        try:
            modules = json.loads(manifest.read_text()).get("modules")
        except (OSError, ValueError):
            modules = None
        if isinstance(modules, list) and "9p.ko" not in modules and "virtiofs.ko" in modules:
            return "virtiofs"
        return "9p"
    config = kernel_config(spec.kernel) if spec.kernel is not None else None
    if config is not None:
        settings = read_config(config)
        has = {name: settings.get(f"CONFIG_{name}") in ("y", "m")
               for name in ("9P_FS", "NET_9P_VIRTIO", "VIRTIO_FS")}
        if not (has["9P_FS"] and has["NET_9P_VIRTIO"]) and has["VIRTIO_FS"]:
            return "virtiofs"
    return "9p"


def host_root(spec: VMSpec, rw: Iterable[str | os.PathLike[str]] = (),
              transport: Literal["auto", "9p", "virtiofs"] = "auto") -> VMSpec:
    """``spec`` with the host's ``/`` as the guest's root (read-only, changes in memory).

    The same as setting ``spec.host_root`` (``host_root = { rw = [...] }`` in a
    spec file) and resolving it (:func:`resolve_host_root`). Each directory in
    ``rw`` is shared writable at the same path (virtiofs, as ``--share`` does).
    ``transport`` of the root: see the module's text (``auto``:
    :func:`root_transport`). Needs the tiny image's init (``qemukit.rootfs=``)
    and overlayfs in the guest. Raises :class:`SpecError` for a spec that boots
    from a disk, a missing ``rw`` directory or a tag or path in use.
    """
    if spec.kernel is None or spec.initrd is None:
        raise SpecError("rootfs", "host", "needs a kernel and the tiny image's initramfs "
                        "(--image tiny, or --kernel with it); an image booting from its disk "
                        "has its own root")
    try:
        wanted = spec.replace(host_root=HostRoot(rw=tuple(os.fspath(d) for d in rw),
                                                 transport=transport))
    except SpecError as exc:
        raise SpecError("rw" if exc.field == "host_root.rw" else "rootfs",
                        exc.value, exc.reason) from exc
    try:
        return resolve_host_root(wanted)
    except SpecError as exc:
        raise SpecError("rw" if exc.field == "host_root.rw" else "rootfs",
                        exc.value, exc.reason) from exc


def resolve_host_root(spec: VMSpec) -> VMSpec:
    """``spec`` with its ``host_root`` ready to boot: the root's transport chosen (``auto``:
    :func:`root_transport`), each ``rw`` directory absolute and checked to exist.

    Every start does this (through :func:`qemukit.kconfig.resolve_kernel`); a spec
    without ``host_root``, or one already resolved, is returned as it is.
    """
    wanted = spec.host_root
    if wanted is None or wanted.resolved:
        return spec
    if spec.initrd is None:
        raise SpecError("host_root", "set", "needs the tiny image's initramfs (its init "
                        "lays the overlay); an image booting from its disk has its own root")
    rw = []
    for directory in wanted.rw:
        path = Path(directory).resolve()
        if not path.is_dir():
            raise SpecError("host_root.rw", directory, "no such directory")
        if path == Path("/"):
            raise SpecError("host_root.rw", directory, "the whole host root cannot be writable")
        rw.append(str(path))
    how = root_transport(spec) if wanted.transport == "auto" else wanted.transport
    if how == "virtiofs":
        _check_virtiofs_root()
    return spec.replace(host_root=HostRoot(rw=tuple(rw), transport=how))


def _check_virtiofs_root() -> None:
    """Refuse the host's root over the C virtiofsd for a normal user, saying why.

    A normal user runs that daemon in a user namespace where the host's root is
    unmapped; the guest's overlay opens its lower files with ``O_NOATIME`` (the
    mounter, the guest's root, may), and the host refuses that flag on files the
    user does not own, so every program of the host fails with EPERM. QEMU's 9p
    server drops the flag when it is refused, and the Rust virtiofsd runs
    without a namespace.
    """
    from .host import find_virtiofsd

    daemon = find_virtiofsd()
    if os.geteuid() == 0 or daemon is None or daemon[1] != "c":
        return
    raise SpecError("rootfs", "host", f"as a normal user the host's root can go over 9p only: "
                    f"the guest kernel here has no 9p, and {daemon[0]} (the C virtiofsd, in a "
                    "user namespace) refuses the guest overlay's O_NOATIME opens of files you "
                    "do not own (EPERM on every program). Use a kernel with CONFIG_9P_FS "
                    "(qemukit kconfig gives it: --kernel TREE), install the Rust virtiofsd, "
                    "or run as root")


def in_directory(command: Sequence[str], cwd: str | os.PathLike[str]) -> list[str]:
    """``command`` as an argv that starts in ``cwd`` (the guest exits 125 if it is missing)."""
    return ["sh", "-c", 'cd "$1" 2>/dev/null || { echo "qemukit: no directory $1 in the guest" '
            '>&2; exit 125; }; shift; exec "$@"', "sh", os.fspath(cwd), *command]
