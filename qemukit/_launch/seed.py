"""cloud-init NoCloud seeds made per VM, and what it takes to reach the guest over SSH.

A seed is a small ISO 9660 image labelled ``cidata`` holding two files,
``meta-data`` (instance id, host name, SSH public keys) and ``user-data``
(the user's file passed through byte for byte, or a minimal
``#cloud-config``). It is written with pycdlib, a pure-Python ISO writer,
so no ``genisoimage``/``xorriso`` has to be installed or spawned.

The SSH keys go into the meta-data's ``public-keys``, which cloud-init
installs for the image's default user whatever the user-data says: a
``--user-data`` file does not have to repeat them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostError, SpecError, WaitTimeout
from ..spec import CloudInit
from .argv import SEED_DEVICE_ID, SEED_FILE, seed_device_args
from .process import run_command
from .usernet import UsernetForward, parse_usernet

__all__ = [
    "SEED_DEVICE_ID",
    "SSH_OPTIONS_THROWAWAY",
    "Seed",
    "UsernetForward",
    "build_seed",
    "default_user_data",
    "generate_keypair",
    "identity_file",
    "meta_data",
    "parse_usernet",
    "read_seed_iso",
    "seed_device_args",
    "ssh_argv",
    "wait_for_ssh",
    "write_seed_iso",
]

#: The seed CD's device id (its block nodes are ``cidata-file`` and ``cidata-fmt``).
KEY_FILE = "ssh_key"
#: Throwaway guests get new host keys on every boot: never prompt, never remember them.
SSH_OPTIONS_THROWAWAY = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
)
_KEY_RE = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( .*)?")


@dataclass(frozen=True)
class Seed:
    """A VM's seed: the ISO, the keys it authorizes, and the private key qemukit made (if any)."""

    iso: Path
    instance_id: str
    hostname: str
    public_keys: tuple[str, ...]
    identity: Path | None


def default_user_data() -> bytes:
    """The user-data used when none is given: nothing beyond the image's own defaults."""
    return b"#cloud-config\n{}\n"


def meta_data(instance_id: str, hostname: str, public_keys: Sequence[str]) -> bytes:
    """NoCloud meta-data. Written as JSON, which every YAML parser reads."""
    data: dict[str, object] = {"instance-id": instance_id, "local-hostname": hostname}
    if public_keys:
        data["public-keys"] = list(public_keys)
    return (json.dumps(data, indent=2) + "\n").encode()


def write_seed_iso(path: Path, files: dict[str, bytes]) -> None:
    """Write an ISO labelled ``cidata`` holding ``files`` (name -> content) at its root.

    Each file gets an ISO 9660 8.3 name plus its real name in both Joliet and
    Rock Ridge, so any reader (cloud-init mounts it with the kernel's
    iso9660 driver) sees ``meta-data`` and ``user-data``.
    """
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata", sys_ident="LINUX")
    try:
        for index, (name, data) in enumerate(sorted(files.items())):
            short = re.sub(r"[^A-Z0-9_]", "", name.upper())[:8] or f"FILE{index}"
            iso.add_fp(io.BytesIO(data), len(data), f"/{short}.;1", rr_name=name,
                       joliet_path=f"/{name}")
        tmp = path.with_name(f".{path.name}.tmp")
        iso.write(str(tmp))
        os.replace(tmp, path)
    finally:
        iso.close()


def read_seed_iso(path: Path) -> dict[str, bytes]:
    """The files in a seed ISO by their Rock Ridge names (for checks and debugging)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()


def generate_keypair(path: Path, comment: str) -> Path:
    """Make an ed25519 keypair at ``path`` (private) and ``path.pub``; returns the public key's path."""
    try:
        out = run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                           "-f", str(path)], timeout=30)
    except HostError as exc:
        raise HostError(f"{exc}; install openssh-client to get ssh-keygen") from exc
    if out.returncode != 0:
        raise HostError(f"ssh-keygen failed (exit {out.returncode}): {out.stderr.strip()}")
    return path.with_name(path.name + ".pub")


def _read_public_keys(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("cloud_init.ssh_key", str(path), f"cannot read it: {exc}") from exc
    keys = tuple(line.strip() for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys or not all(_KEY_RE.fullmatch(k) for k in keys):
        raise SpecError("cloud_init.ssh_key", str(path),
                        "is not an SSH public key file (give the .pub file, not the private key)")
    return keys


def build_seed(cloud_init: CloudInit, directory: Path, vm_name: str) -> Seed:
    """Write ``directory/seed.iso`` for VM ``vm_name``; generate a keypair there if none was given."""
    identity: Path | None = None
    if cloud_init.ssh_key is not None:
        keys = _read_public_keys(Path(cloud_init.ssh_key))
    else:
        identity = directory / KEY_FILE
        keys = _read_public_keys(generate_keypair(identity, f"qemukit@{vm_name}"))
    if cloud_init.user_data is not None:
        try:
            user_data = Path(cloud_init.user_data).read_bytes()
        except OSError as exc:
            raise SpecError("cloud_init.user_data", cloud_init.user_data,
                            f"cannot read it: {exc.strerror or exc}") from exc
    else:
        user_data = default_user_data()
    hostname = cloud_init.hostname or _hostname_from(vm_name)
    # Same name and same seed content -> same instance: a kept disk booted again is not
    # re-initialised, while a new key or new user-data makes cloud-init apply them.
    digest = hashlib.sha256("\n".join(keys).encode() + b"\0" + user_data).hexdigest()[:10]
    instance_id = f"qemukit-{vm_name}-{digest}"
    iso = directory / SEED_FILE
    write_seed_iso(iso, {"meta-data": meta_data(instance_id, hostname, keys),
                         "user-data": user_data})
    return Seed(iso, instance_id, hostname, keys, identity)


def _hostname_from(vm_name: str) -> str:
    """A valid host name from a VM name (which may hold '_' and '.')."""
    label = re.sub(r"[^a-z0-9-]", "-", vm_name.lower()).strip("-")[:63]
    return label or "qemukit"


# --------------------------------------------------------------------------- ssh


def ssh_argv(host: str, port: int, user: str, identity: Path | None,
             command: Sequence[str] = (), *, throwaway: bool = True,
             options: Sequence[str] = ()) -> list[str]:
    """The ``ssh`` argv to reach a guest (an argv list: it is exec'd, never run by a shell).

    ``command`` is passed after ``--``; ssh joins its words with spaces for
    the remote shell, as it always does.
    """
    argv = ["ssh", "-p", str(port), "-l", user]
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if throwaway:
        argv += list(SSH_OPTIONS_THROWAWAY)
    argv += list(options)
    argv.append(host)
    if command:
        argv += ["--", *command]
    return argv


def identity_file(cloud_init: CloudInit | None, runtime_dir: Path) -> Path | None:
    """The private key that logs in to a guest seeded with ``cloud_init``, if qemukit knows it.

    That is the keypair generated into the runtime directory, or the private
    half next to a given ``KEY.pub``; else None (ssh then uses its own defaults).
    """
    if cloud_init is None:
        return None
    if cloud_init.ssh_key is None:
        generated = runtime_dir / KEY_FILE
        return generated if generated.is_file() else None
    public = Path(cloud_init.ssh_key)
    private = public.with_suffix("") if public.suffix == ".pub" else None
    return private if private is not None and private.is_file() else None


async def wait_for_ssh(argv: Sequence[str], timeout: float) -> int:
    """Run ``argv`` (an ssh login running ``true``) until it succeeds; returns the attempts made.

    Nothing announces that sshd accepts a key: the guest's sshd starts once
    cloud-init has made host keys and installed ours, and the only proof is
    a login that works. So this tries, backing off from 0.5 s to 3 s between
    attempts, until ``timeout``; each attempt is bounded by ssh's own
    ConnectTimeout and a hard limit.
    """
    if shutil.which(argv[0]) is None:
        raise HostError(f"{argv[0]} not found; install openssh-client")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, attempts = 0.5, 0
    while True:
        attempts += 1
        limit = max(5.0, min(deadline - loop.time(), 30.0))
        try:
            out = await asyncio.to_thread(run_command, list(argv), timeout=limit)
        except HostError as exc:  # this attempt hung: the guest is busy booting
            last = str(exc)
        else:
            if out.returncode == 0:
                return attempts
            lines = (out.stderr or out.stdout).strip().splitlines()
            last = lines[-1] if lines else f"exit status {out.returncode}"
        if loop.time() + delay >= deadline:
            raise WaitTimeout(f"ssh to log in ({attempts} attempts; last: {last})", timeout)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 3.0)
