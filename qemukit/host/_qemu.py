"""The QEMU binary: which one, its version and features (cached per binary, on disk)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._fs import write_atomic
from .._launch.process import run_command
from ..arch import ARCHES, DEFAULT_ARCH
from ..errors import HostError
from ..paths import cache_dir


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system binary and what it supports (read from its own help)."""

    path: str
    version: tuple[int, int, int]
    version_text: str
    machines: frozenset[str]
    has_sandbox: bool
    qemu_img: str | None
    has_run_with: bool = False

    @property
    def version_string(self) -> str:
        """The version as ``major.minor.micro``."""
        return ".".join(map(str, self.version))


@functools.lru_cache(maxsize=8)
def _probe_binary(path: str) -> QemuBinary:
    out = run_command([path, "-version"], timeout=20)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise HostError(f"{path} -version failed: {(out.stdout + out.stderr).strip()[:300]}")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    help_text = run_command([path, "-help"], timeout=20).stdout
    machines_text = run_command([path, "-machine", "help"], timeout=20).stdout
    machines = frozenset(
        line.split()[0] for line in machines_text.splitlines()[1:] if line.strip()
    )
    img = shutil.which("qemu-img", path=str(Path(path).parent)) or shutil.which("qemu-img")
    return QemuBinary(
        path=path,
        version=version,
        version_text=out.stdout.splitlines()[0].strip(),
        machines=machines,
        has_sandbox=bool(re.search(r"^-sandbox ", help_text, re.MULTILINE)),
        qemu_img=img,
        has_run_with=bool(re.search(r"^-run-with ", help_text, re.MULTILINE)),
    )


def qemu_env_var(arch: str = DEFAULT_ARCH) -> str:
    """The variable naming the QEMU binary for ``arch`` (:attr:`ArchInfo.qemu_env`):
    ``QEMUKIT_QEMU`` for the default architecture, ``QEMUKIT_QEMU_<ARCH>`` (e.g.
    ``QEMUKIT_QEMU_AARCH64``) for the others."""
    return ARCHES[arch].qemu_env


def find_qemu_img(qemu: QemuBinary | None = None) -> str:
    """The qemu-img to use: the one beside ``qemu`` (found with it), else the one on PATH.

    The one place that says it is missing: :class:`HostError` naming the package.
    """
    found = qemu.qemu_img if qemu is not None else shutil.which("qemu-img")
    if found is None:
        raise HostError("qemu-img not found; install it with: apt-get install qemu-utils")
    return found


def qemu_path(arch: str) -> str | None:
    """Where the QEMU for ``arch`` is (its variable, else its binary on PATH), or None."""
    info = ARCHES[arch]
    env = os.environ.get(qemu_env_var(arch))
    path = env or shutil.which(info.qemu_binary)
    if not path or not os.access(path, os.X_OK):
        return None
    return path if env else str(Path(path).resolve())


def find_qemu(arch: str) -> QemuBinary:
    """The QEMU for guests of ``arch``: its variable (:func:`qemu_env_var`), else the
    architecture's ``qemu-system-*`` on PATH. There is no default: a VM finds its
    QEMU once, for its own architecture, and carries it (``AsyncVM.qemu``).

    A missing binary raises :class:`HostError` naming the Debian package.
    """
    info = ARCHES[arch]
    var = qemu_env_var(arch)
    env = os.environ.get(var)
    path = qemu_path(arch)
    if path is None:
        where = f"${var}={env!r}" if env else f"{info.qemu_binary} on PATH"
        raise HostError(
            f"no QEMU for {arch} guests found ({where}); install it with: "
            f"apt-get install {info.qemu_package} qemu-utils"
        )
    return _facts(path)


@functools.lru_cache(maxsize=8)
def _facts(path: str) -> QemuBinary:
    """The binary's facts: from the on-disk cache while the file is unchanged, else probed.

    Probing runs QEMU three times (about 45 ms), which every short-lived
    ``qemukit`` command would otherwise pay.
    """
    st = os.stat(path)
    key = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    cached = read_cache("qemu-facts.json", key)
    if cached is not None:
        try:
            cached["version"] = tuple(cached["version"])
            cached["machines"] = frozenset(cached["machines"])
            return QemuBinary(**cached)
        except (KeyError, TypeError):
            pass
    facts = _probe_binary(path)
    write_cache("qemu-facts.json", key, {**asdict(facts), "machines": sorted(facts.machines)})
    return facts


def read_cache(name: str, key: str) -> dict[str, Any] | None:
    """The data cached under ``name`` in the cache dir, if it was stored for ``key``."""
    try:
        cached = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    data = cached.get("data")
    return data if isinstance(data, dict) else None


def write_cache(name: str, key: str, data: dict[str, Any]) -> None:
    """Store ``data`` for ``key``; an unwritable cache only costs a probe next time."""
    with contextlib.suppress(OSError):
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_atomic(cache_dir() / name, json.dumps({"key": key, "data": data}))
