"""Built-in guest images: build them from Debian's packages, find them, boot them.

``qemukit.images.spec("tiny")`` returns a ready :class:`~qemukit.spec.VMSpec`
for the tiny image (a Debian cloud kernel and a busybox initramfs with the
qemukit agent); build it once with ``qemukit images build tiny``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import HostError, SpecError
from ..paths import cache_dir
from ..spec import VMSpec
from .tiny import TinyImage, build_tiny, find_tiny

__all__ = ["NAMES", "TINY_APPEND", "TinyImage", "build", "find_image", "recipe_dir", "spec"]

NAMES = ("tiny",)
#: The tiny guest's default kernel command line: serial console, a panic ends
#: QEMU at once (with -no-reboot), hot-added memory comes online by itself.
TINY_APPEND = "console=ttyS0 panic=-1 quiet memhp_default_state=online"


def recipe_dir(name: str) -> Path:
    """Where an image's recipe files live (installed wheel, or the source tree)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_recipes" / name, here.parent / "images" / name):
        if candidate.is_dir():
            return candidate
    raise HostError(f"the recipe for image {name!r} is missing from this installation")


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise SpecError("image", name, f"unknown image; choose from {', '.join(NAMES)}")


def find_image(name: str) -> TinyImage | None:
    """The built image called ``name`` in the cache, or None."""
    _check_name(name)
    return find_tiny(cache_dir())


def build(
    name: str, *, force: bool = False, progress: Callable[[str], None] = lambda s: None
) -> TinyImage:
    """Build image ``name`` into the cache (skipped if already built, unless ``force``)."""
    _check_name(name)
    if not force:
        found = find_image(name)
        if found is not None:
            progress(f"already built: {found.directory}")
            return found
    try:
        return build_tiny(cache_dir(), recipe_dir(name), progress=progress, force=force)
    except (RuntimeError, OSError) as exc:
        raise HostError(f"building image {name!r} failed: {exc}") from exc


def spec(name: str = "tiny", **overrides: Any) -> VMSpec:
    """A ready :class:`VMSpec` booting image ``name``; keyword arguments override fields.

    Raises :class:`HostError` if the image is not built yet (unless ``kernel``
    and ``initrd`` are both overridden).
    """
    _check_name(name)
    image = find_image(name)
    kernel = overrides.pop("kernel", None)
    initrd = overrides.pop("initrd", None)
    if image is None and (kernel is None or initrd is None):
        raise HostError(f"image {name!r} is not built; run: qemukit images build {name}")
    base = VMSpec(
        machine="q35",
        memory=512,
        kernel=str(kernel or image.kernel),  # type: ignore[union-attr]
        initrd=str(initrd or image.initrd),  # type: ignore[union-attr]
        append=TINY_APPEND,
        no_reboot=True,
    )
    return base.replace(**overrides) if overrides else base
