"""Whether this host can run another architecture's programs (binfmt_misc + qemu-user).

Building a Debian tree of another architecture (mmdebstrap ``--architectures``)
runs that tree's maintainer scripts, which only works when the kernel hands
foreign ELF binaries to a qemu-user interpreter: a ``binfmt_misc`` entry, as
Debian's ``qemu-user-static`` registers them. The probe only reads
``/proc/sys/fs/binfmt_misc``; it changes nothing.
"""

from __future__ import annotations

import platform
from pathlib import Path

from ..arch import ARCHES, host_arch_name

#: Where the kernel's binfmt_misc file system is mounted.
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
#: The entry names qemu-user-static registers, by guest architecture.
BINFMT_ENTRIES = {name: info.qemu_user for name, info in ARCHES.items()}
_INSTALL = ("apt-get install qemu-user-static binfmt-support, then update-binfmts --enable {entry} "
            "(scripts/setup does both)")


def foreign_exec_problem(arch: str, binfmt_dir: Path = BINFMT_DIR,
                         host_machine: str | None = None) -> str | None:
    """One line saying why programs of guest architecture ``arch`` cannot run here, or None.

    None also for the host's own architecture (nothing to emulate). Otherwise
    the kernel needs binfmt_misc mounted and enabled, and an enabled entry
    for ``arch`` registered with the ``F`` flag (the kernel opens its
    interpreter at registration, so it is found inside a chroot too).
    ``binfmt_dir`` and ``host_machine`` exist for tests.
    """
    if arch not in ARCHES:
        raise KeyError(arch)
    if host_arch_name(host_machine or platform.machine()) == arch:
        return None
    debian = ARCHES[arch].debian_arch
    entry = BINFMT_ENTRIES[arch]
    status = binfmt_dir / "status"
    try:
        state = status.read_text(encoding="utf-8").strip()
    except OSError:
        return (f"running {debian} programs needs binfmt_misc, which is not mounted at "
                f"{binfmt_dir}: mount -t binfmt_misc binfmt_misc {binfmt_dir} as root "
                "(scripts/setup does where the kernel allows it)")
    if state != "enabled":
        return f"binfmt_misc is {state or 'not enabled'} ({status}): echo 1 > {status} as root"
    path = binfmt_dir / entry
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return (f"no binfmt_misc entry runs {debian} programs ({path} is missing): "
                + _INSTALL.format(entry=entry))
    if not lines or lines[0].strip() != "enabled":
        return f"the binfmt_misc entry {path} is disabled: update-binfmts --enable {entry}"
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    interpreter = fields.get("interpreter", "").strip()
    flags = fields.get("flags:", "").strip()
    if "F" not in flags:
        # Without F the kernel looks the interpreter up in the chroot, where it is not.
        return (f"the binfmt_misc entry {path} lacks the F (fix-binary) flag, so its interpreter "
                f"{interpreter or '?'} is not found inside a chroot: install qemu-user-static "
                "(its entries have it) and update-binfmts --enable " + entry)
    return None
