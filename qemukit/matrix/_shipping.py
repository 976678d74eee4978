"""Files a matrix ships to Dask workers: read and checked on the client, kept by hash there.

The client reads each local file a job names (a kernel tree becomes its built
image and its installed modules; a modules directory a tar archive) with
:func:`files_to_ship` and :func:`read_for_shipping`; a worker writes each to
``<cache>/matrix-files/<sha256>/<name>`` with :func:`materialize`, unpacking
archives by the rules of tarfile's ``"data"`` filter (:func:`extract_tree`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from .. import images, kconfig
from ..arch import DEFAULT_ARCH
from ..errors import SpecError
from ..paths import cache_dir
from ..spec import VMSpec
from ._file import Job

__all__ = ["KERNEL_DIR", "bundled_image", "extract_tree", "files_to_ship", "materialize",
           "read_for_shipping"]

#: The name suffix of a shipped kernel image bundled with its .config (a directory).
KERNEL_DIR = ".kernel"


def bundled_image(bundle: Path) -> Path:
    """The kernel image in a shipped bundle (the file beside its ``.config``)."""
    found = [p for p in bundle.iterdir() if p.name != ".config" and p.is_file()]
    if len(found) != 1:
        raise OSError(f"{bundle}: expected one kernel image beside .config")
    return found[0]

log = logging.getLogger(__name__)

_DIGEST = re.compile("[0-9a-f]{64}")


def _tar_directory(path: Path) -> bytes:
    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # modules_install's build/source links point into the tree, which the worker has
        # not got (and the data filter refuses absolute links); the initramfs skips them too.
        parts = Path(member.name).parts
        if member.issym() and parts[-1] in ("build", "source") and "modules" in parts:
            return None
        return member

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=".", filter=keep)
    return buffer.getvalue()


def _tree_probe(job: Job) -> VMSpec:
    """The job's VM description with its kernel tree, for checking the tree's config on the
    client (the tiny image's initramfs and command line stand in when it boots with them)."""
    fields = {k: v for k, v in job.vm.items() if k not in ("warm",)}
    arch = str(fields.get("arch", DEFAULT_ARCH))
    if job.needs_image() == "tiny":
        fields.setdefault("append", images.tiny_append(arch))
    fields.setdefault("initrd", "initrd")  # a name: nothing reads it here
    return VMSpec.from_dict(fields)


def files_to_ship(job: Job, workdir: Path, installed: dict[Path, Path]) -> dict[str, Path]:
    """The files a job's task needs, by key; a kernel tree becomes its image and modules.

    ``installed`` remembers the modules installed per tree (into ``workdir``), so a tree
    used by many jobs is installed once.
    """
    files = job.files()
    kernel = files.get("kernel")
    if kernel is None or not kernel.is_dir():
        return files
    where = f"job {job.name!r}"
    try:
        resolved = kconfig.resolve_kernel(_tree_probe(job), files.get("modules"))
    except SpecError as exc:
        raise SpecError(f"{where}: {exc.field}", exc.value, exc.reason) from exc
    assert resolved.tree is not None and resolved.spec.kernel is not None
    files["kernel"] = Path(resolved.spec.kernel)
    if resolved.config is not None:
        # The image and its .config travel together, so the worker finds the config
        # beside the image: its result keeps kernel_config_sha256, and its machine is
        # chosen from the same config as here. Once per tree, as its modules are.
        image = Path(resolved.spec.kernel)
        key = Path(f"{image}{KERNEL_DIR}")
        if key not in installed:
            workdir.mkdir(parents=True, exist_ok=True)
            bundle = Path(tempfile.mkdtemp(prefix="kernel-", suffix=KERNEL_DIR, dir=workdir))
            shutil.copyfile(image, bundle / image.name)
            shutil.copyfile(resolved.config, bundle / ".config")
            installed[key] = bundle
        files["kernel"] = installed[key]
    if resolved.install_tree_modules:
        root = resolved.tree.root.resolve()
        if root not in installed:
            installs = sum(1 for k in installed if not k.name.endswith(KERNEL_DIR))
            target = workdir / f"modules-{installs}"
            log.info("matrix: installing the modules of %s to ship them", root)
            installed[root] = kconfig.install_modules(resolved.tree, target)
        files["modules"] = installed[root]
    return files


def read_for_shipping(key: str, path: Path) -> bytes:
    """The bytes to ship for ``path`` (a tar archive for ``modules``); errors name ``key``."""
    try:
        if path.name.endswith(KERNEL_DIR):  # a kernel image with its .config beside it
            return _tar_directory(path)
        if key == "modules":
            if not path.is_dir():
                raise SpecError("modules", str(path), "no such directory")
            return _tar_directory(path)
        return path.read_bytes()
    except OSError as exc:
        raise SpecError(key, str(path), f"cannot read it to send it to the workers: "
                        f"{exc.strerror or exc}") from exc


def extract_tree(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack ``tar`` into ``dest`` by the rules of tarfile's ``"data"`` filter.

    Python 3.11.4 added the filter; Debian 12's own python3 is 3.11.2, so where
    it is missing the same rules are checked here: every name and link stays
    inside ``dest``, only files, directories and links, no set-ID, sticky or
    group/other write bits, and no owner taken from the archive.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    members = []
    for member in tar.getmembers():
        where = os.path.normpath(os.path.join(root, member.name))
        if os.path.isabs(member.name) or os.path.commonpath([root, where]) != root:
            raise tarfile.TarError(f"{member.name!r} would be written outside {dest}")
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise tarfile.TarError(f"{member.name!r} is not a file, directory or link")
        if member.issym() or member.islnk():
            base = os.path.dirname(where) if member.issym() else root
            points = os.path.normpath(os.path.join(base, member.linkname))
            if os.path.isabs(member.linkname) or os.path.commonpath([root, points]) != root:
                raise tarfile.TarError(f"{member.name!r} links outside {dest}")
        member.mode &= 0o755
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        members.append(member)
    tar.extractall(dest, members=members, numeric_owner=True)


def materialize(key: str, digest: str, name: str, data: bytes) -> str:
    """Where this worker keeps the shipped file: ``<cache>/matrix-files/<digest>/<name>``.

    Idempotent and safe when many tasks (threads, or workers sharing the cache)
    ship at once: each name is written beside its place and renamed into it,
    so a reader sees it whole or not at all; whoever comes second finds it
    there (or replaces a file with the same bytes). Bytes whose SHA-256 is not
    ``digest`` raise :class:`ValueError` before anything is written. The same content under
    another name (two jobs' kernels copied to different file names) is one
    more name in the same digest's directory.
    """
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a SHA-256 digest: {digest!r}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a file name: {name!r}")
    root = cache_dir() / "matrix-files" / digest
    target = root / name
    if target.exists():  # placed by whoever came first, with bytes of this digest
        return str(target)
    # The name is the digest's: bytes that are not its (a client of a shared cluster
    # planting a kernel that another client's job with that digest would boot) go nowhere.
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise ValueError(f"{key} {name!r}: the bytes sent have SHA-256 {actual}, not the "
                         f"digest {digest} they were sent under")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root.parent))
    try:
        if key == "modules" or name.endswith(KERNEL_DIR):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                extract_tree(tar, tmp / name)
        else:
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp / name, target)  # a file replaces one of the same bytes: fine
        except OSError as exc:
            # A directory (modules) another task renamed in first: the same tree.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
