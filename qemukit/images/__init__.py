"""Built-in guest images: build them from Debian's packages, find them, boot them.

``qemukit.images.spec("tiny")`` returns a ready :class:`~qemukit.spec.VMSpec`
for the tiny image (a Debian cloud kernel and a busybox initramfs with the
qemukit agent); build it once with ``qemukit images build tiny``.
``spec("debian")`` boots Debian bookworm (systemd, sshd, qemu-guest-agent,
cloud-init) on a throwaway overlay with a per-VM cloud-init seed; build it
with ``qemukit images build debian`` (needs root and mmdebstrap; ``suite``,
``packages`` and ``bootable`` pick other builds, each cached by its inputs).
``spec("debian", arch="aarch64")`` boots the arm64 build on the virt machine
(built with ``images build debian --arch aarch64``, under qemu-user).

A user's own disk image (a distribution's cloud image) is registered with
:func:`import_image` and never written; ``spec(NAME)`` then boots it through
its own bootloader (OVMF or SeaBIOS) on an overlay, with a cloud-init seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from ..arch import ARCHES, DEFAULT_ARCH, ArchName, arch_option
from ..errors import HostError, SpecError
from ..paths import cache_dir, cache_dir_error, hand_over_cache, invoking_user
from ..spec import CloudInit, Drive, Nic, PortForward, VMSpec
from . import imported as _imported
from .debian import (
    DEBIAN_APPEND,
    DEFAULT_SUITE,
    SUITES,
    DebianImage,
    build_debian,
    check_arch,
    check_packages,
    debian_append,
    find_debian,
)
from .imported import ImportedImage, find_imported
from .tiny import TinyImage, build_tiny, find_tiny

__all__ = [
    "DEBIAN_APPEND", "NAMES", "TINY_APPEND", "DebianImage", "ImportedImage", "TinyImage", "build",
    "debian_append", "find_image", "import_image", "list_imported", "recipe_dir", "remove_imported",
    "spec", "tiny_append",
]

NAMES = ("tiny", "debian")
#: The tiny guest's default kernel command line: serial console, a panic ends
#: QEMU at once (with -no-reboot), hot-added memory comes online by itself.
TINY_APPEND = "console=ttyS0 panic=-1 quiet memhp_default_state=online"


def tiny_append(arch: str = DEFAULT_ARCH) -> str:
    """The tiny guest's kernel command line for ``arch`` (its console device)."""
    if arch not in ARCHES:
        raise SpecError("arch", arch, f"must be one of {', '.join(ARCHES)}")
    return TINY_APPEND.replace("console=ttyS0", f"console={ARCHES[arch].console}")


def recipe_dir(name: str) -> Path:
    """Where an image's recipe files live (installed wheel, or the source tree)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_recipes" / name, here.parent / "images" / name):
        if candidate.is_dir():
            return candidate
    raise HostError(f"the recipe for image {name!r} is missing from this installation")


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise SpecError("image", name, f"unknown image; choose from {', '.join(NAMES)} or an "
                        "imported one (qemukit images list)")


def _check_arch(name: str, arch: str) -> None:
    if arch not in ARCHES:
        raise SpecError("arch", arch, f"must be one of {', '.join(ARCHES)}")
    if name == "debian":
        check_arch(arch)


@overload
def find_image(name: Literal["tiny"], arch: str = ...) -> TinyImage | None: ...
@overload
def find_image(name: Literal["debian"], arch: str = ...) -> DebianImage | None: ...
@overload
def find_image(name: str, arch: str = ...) -> TinyImage | DebianImage | None: ...
def find_image(name: str, arch: str = DEFAULT_ARCH) -> TinyImage | DebianImage | None:
    """The built image called ``name`` (for guest architecture ``arch``) in the cache, or None."""
    _check_name(name)
    _check_arch(name, arch)
    try:
        if name == "debian":
            return find_debian(cache_dir(), arch=arch)
        return find_tiny(cache_dir(), recipe_dir(name), arch=arch)
    except OSError as exc:
        raise _os_error(exc, f"looking for image {name!r} failed") from exc


def _os_error(exc: OSError, doing: str) -> HostError:
    """``exc`` as a HostError; one about the cache directory says so and names QEMUKIT_CACHE."""
    root = cache_dir()
    filename = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
    if filename is not None and (filename.is_relative_to(root) or root.is_relative_to(filename)):
        return HostError(f"{doing}: {cache_dir_error(root, exc)}")
    return HostError(f"{doing}: {exc}")


@overload
def build(name: Literal["tiny"], *, force: bool = ..., progress: Callable[[str], None] = ...,
          arch: str = ..., suite: str | None = ..., packages: Sequence[str] = ...,
          bootable: bool = ...) -> TinyImage: ...
@overload
def build(name: Literal["debian"], *, force: bool = ..., progress: Callable[[str], None] = ...,
          arch: str = ..., suite: str | None = ..., packages: Sequence[str] = ...,
          bootable: bool = ...) -> DebianImage: ...
@overload
def build(name: str, *, force: bool = ..., progress: Callable[[str], None] = ...,
          arch: str = ..., suite: str | None = ..., packages: Sequence[str] = ...,
          bootable: bool = ...) -> TinyImage | DebianImage: ...
def build(
    name: str, *, force: bool = False, progress: Callable[[str], None] = lambda s: None,
    arch: str = DEFAULT_ARCH, suite: str | None = None, packages: Sequence[str] = (),
    bootable: bool = False,
) -> TinyImage | DebianImage:
    """Build image ``name`` (for guest architecture ``arch``) into the cache.

    Skipped if already built from the same inputs, unless ``force``. For
    debian, ``suite`` (bookworm, trixie, sid), extra ``packages`` and
    ``bootable`` (a whole disk UEFI firmware boots) choose the build; each
    combination is cached by its own key. A foreign architecture's packages
    are fetched with apt pointed at lists of their own (the host's dpkg
    configuration is not changed); a foreign debian tree is built under
    qemu-user (binfmt_misc), and ``bootable`` is x86_64 only.

    Run as root under sudo, the image lands in the invoking user's cache and
    is given to that user (:func:`qemukit.paths.hand_over_cache`).
    """
    try:
        return _build(name, force=force, progress=progress, arch=arch, suite=suite,
                      packages=packages, bootable=bootable)
    finally:
        if invoking_user() is not None:
            hand_over_cache()


def _build(name: str, *, force: bool, progress: Callable[[str], None], arch: str,
           suite: str | None, packages: Sequence[str], bootable: bool) -> TinyImage | DebianImage:
    _check_name(name)
    _check_arch(name, arch)
    if name != "debian" and (suite is not None or packages or bootable):
        raise SpecError("image", name, "--suite, --packages and --bootable are for debian")
    if name == "debian":
        suite = suite or DEFAULT_SUITE
        if suite not in SUITES:
            raise SpecError("suite", suite, f"must be one of {', '.join(SUITES)}")
        extra = check_packages(packages)
        check_arch(arch, bootable)
        try:
            return build_debian(cache_dir(), recipe_dir(name), progress=progress, force=force,
                                suite=suite, packages=extra, bootable=bootable, arch=arch)
        except RuntimeError as exc:
            raise HostError(f"building image {name!r} failed: {exc}") from exc
        except OSError as exc:
            raise _os_error(exc, f"building image {name!r} failed") from exc
    if not force:
        found = find_image(name, arch)
        if found is not None:
            progress(f"already built: {found.directory}")
            return found
    try:
        return build_tiny(cache_dir(), recipe_dir(name), progress=progress, force=force,
                          arch=arch)
    except RuntimeError as exc:
        raise HostError(f"building image {name!r} failed: {exc}") from exc
    except OSError as exc:
        raise _os_error(exc, f"building image {name!r} failed") from exc


def spec(name: str = "tiny", *, suite: str | None = None, packages: Sequence[str] = (),
         **overrides: Any) -> VMSpec:
    """A ready :class:`VMSpec` booting image ``name``; keyword arguments override fields.

    ``name`` is a built-in image or one registered with :func:`import_image`.
    For debian, ``suite`` and ``packages`` pick the build (as :func:`build` made
    it, each cached by its inputs): the spec boots that build, not the default one.
    Raises :class:`HostError` if the image is not built yet (unless ``kernel``
    and ``initrd`` are both overridden, for tiny).
    """
    if name not in NAMES:
        imported = find_imported(cache_dir(), name)
        if imported is not None:
            return _imported_spec(imported, overrides)
    _check_name(name)
    arch = overrides.pop("arch", DEFAULT_ARCH)
    _check_arch(name, arch)
    if name == "debian":
        return _debian_spec(overrides, arch, suite, packages)
    if suite is not None or packages:
        raise SpecError("image", name, "suite and packages are for debian")
    image = find_image(name, arch)
    kernel = overrides.pop("kernel", None)
    initrd = overrides.pop("initrd", None)
    if image is None and (kernel is None or initrd is None):
        flag = arch_option(arch)
        raise HostError(f"image {name!r}{' for ' + arch if flag else ''} is not built; "
                        f"run: qemukit images build {name}{flag}")
    base = VMSpec(
        arch=arch,
        memory=512,
        kernel=str(kernel or image.kernel),  # type: ignore[union-attr]
        initrd=str(initrd or image.initrd),  # type: ignore[union-attr]
        append=tiny_append(arch),
        no_reboot=True,
    )
    return base.replace(**overrides) if overrides else base


def _debian_spec(overrides: dict[str, Any], arch: ArchName, suite: str | None,
                 packages: Sequence[str]) -> VMSpec:
    """The debian guest: 2 vCPUs, 1 GiB, a throwaway overlay, ssh on a free 127.0.0.1 port.

    On x86_64 the machine is q35; aarch64 gets virt (the spec maps it), the
    same devices on PCI and its console on ttyAMA0.
    """
    chosen = suite or DEFAULT_SUITE
    if chosen not in SUITES:
        raise SpecError("suite", chosen, f"must be one of {', '.join(SUITES)}")
    extra = check_packages(packages)
    try:
        image = find_debian(cache_dir(), suite=chosen, packages=extra, arch=arch)
    except OSError as exc:
        raise _os_error(exc, "looking for image 'debian' failed") from exc
    if image is None:
        flag = "" if arch == DEFAULT_ARCH else f" --arch {arch}"
        flag += f" --suite {chosen}" if suite is not None else ""
        flag += f" --packages {','.join(extra)}" if extra else ""
        raise HostError(f"image 'debian'{' for ' + arch if arch != DEFAULT_ARCH else ''} is not "
                        f"built; run: qemukit images build debian{flag}")
    base = VMSpec(
        arch=arch,
        machine="q35",
        cpus=2,
        memory=1024,
        kernel=str(image.kernel),
        initrd=str(image.initrd),
        append=debian_append(arch),
        drives=(Drive(image.disk, format="qcow2", overlay=True),),
        # Host port 0: the kernel picks a free port, no race; vm.ssh_address() reads it back.
        nics=(Nic(forwards=(PortForward(0, 22),)),),
        agent="qga",
        cloud_init=CloudInit(),
    )
    return _developer(base, overrides)


def _developer(base: VMSpec, overrides: dict[str, Any]) -> VMSpec:
    """``base`` with ``overrides``, and ports forwarding themselves when it can (a developer image).

    Unless ``forward_auto`` is overridden, it is on exactly when the result has
    a user network and a guest agent, so an override that removes either
    turns it off rather than failing.
    """
    spec = base.replace(**overrides) if overrides else base
    if "forward_auto" not in overrides and spec.agent != "none" and any(
            n.kind == "user" for n in spec.nics):
        spec = spec.replace(forward_auto=True)
    return spec


def import_image(name: str, path: str | os.PathLike[str], **options: Any) -> ImportedImage:
    """Register the disk image at ``path`` as ``name`` (never writing it); see :mod:`.imported`."""
    return _imported.import_image(cache_dir(), name, path, **options)


def list_imported() -> list[ImportedImage]:
    """The images registered with :func:`import_image`."""
    return _imported.list_imported(cache_dir())


def remove_imported(name: str) -> ImportedImage:
    """Unregister the imported image ``name`` (its file is left alone)."""
    return _imported.remove_imported(cache_dir(), name)


def _imported_spec(image: ImportedImage, overrides: dict[str, Any]) -> VMSpec:
    """An imported image: booted by its own bootloader on a throwaway overlay, seeded by cloud-init."""
    _imported.verify_unchanged(image)
    overrides.pop("arch", None)
    base = VMSpec(
        machine="q35",
        cpus=2,
        memory=1024,
        firmware="ovmf" if image.firmware == "uefi" else "seabios",
        drives=(Drive(image.path, format="qcow2" if image.format == "qcow2" else "raw", overlay=True),),
        nics=(Nic(forwards=(PortForward(0, 22),)),),
        agent="qga" if image.agent == "qga" else "none",
        cloud_init=CloudInit(ssh_user=image.user),
    )
    return _developer(base, overrides)
