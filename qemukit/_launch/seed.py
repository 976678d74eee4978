"""cloud-init NoCloud seeds made per VM, and what it takes to reach the guest over SSH.

A seed is a small ISO 9660 image labelled ``cidata`` holding two files,
``meta-data`` (instance id, host name, SSH public keys) and ``user-data``
(the user's file passed through byte for byte, or a minimal
``#cloud-config``). It is written with pycdlib, a pure-Python ISO writer,
so no ``genisoimage``/``xorriso`` has to be installed or spawned.

The SSH keys go into the meta-data's ``public-keys``, which cloud-init
installs for the image's default user whatever the user-data says: a
``--user-data`` file does not have to repeat them.

The guest's ssh *host* keys are made here too, on the host, and handed to
cloud-init in the user-data (``ssh_keys``, plus a ``bootcmd`` that puts them
back on each boot, so a kept disk booted again under the same instance id
still presents them); their public halves go into ``known_hosts`` in the
VM's private runtime directory, and :func:`ssh_argv` pins them
(``StrictHostKeyChecking=yes``). A user's own user-data is sent beside
qemukit's part in a MIME multipart, untouched.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from pathlib import Path

from ..errors import HostError, SpecError, WaitTimeout
from ..spec import CloudInit
from .argv import SEED_DEVICE_ID, SEED_FILE, seed_device_args
from .process import run_command
from .usernet import UsernetForward, parse_usernet

__all__ = [
    "HOST_KEY_TYPES",
    "KNOWN_HOSTS_FILE",
    "SEED_DEVICE_ID",
    "SSH_OPTIONS_SAFE",
    "SSH_OPTIONS_THROWAWAY",
    "Seed",
    "UsernetForward",
    "build_seed",
    "default_user_data",
    "generate_host_keys",
    "generate_keypair",
    "host_key_alias",
    "identity_file",
    "known_hosts_file",
    "meta_data",
    "parse_usernet",
    "read_seed_iso",
    "seed_device_args",
    "ssh_argv",
    "wait_for_ssh",
    "write_known_hosts",
    "write_seed_iso",
]

#: The login key qemukit makes in a VM's runtime directory.
KEY_FILE = "ssh_key"
#: The pinned host keys of a VM, in its private runtime directory.
KNOWN_HOSTS_FILE = "known_hosts"
#: The ssh host key types a guest gets (fast to make; sshd's defaults minus RSA).
HOST_KEY_TYPES = ("ed25519", "ecdsa")
#: Always given: the user's ssh config is not read (``-F /dev/null``: no ForwardAgent,
#: ForwardX11, ProxyCommand, ControlMaster or LocalCommand from it) and each of those
#: is also off explicitly; the guest is untrusted, so it gets neither the agent nor X.
SSH_OPTIONS_SAFE = (
    "-F", "/dev/null",
    # As -o, not -a/-x: a flag would override a caller's explicit -o ForwardAgent=yes.
    "-o", "ForwardAgent=no",
    "-o", "ForwardX11=no",
    "-o", "ForwardX11Trusted=no",
    "-o", "ProxyCommand=none",
    "-o", "ProxyJump=none",
    "-o", "PermitLocalCommand=no",
    "-o", "ControlMaster=no",
    "-o", "ControlPath=none",
    "-o", "UpdateHostKeys=no",
    "-o", "GlobalKnownHostsFile=/dev/null",
)
#: Host keys qemukit does not know (no seed made by it): not checked, not remembered.
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
    #: The guest's ssh host key files (``ssh_host_<type>_key`` and ``.pub``) given to cloud-init.
    host_keys: Mapping[str, bytes] | None = None


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


def generate_host_keys(comment: str, types: Sequence[str] = HOST_KEY_TYPES) -> dict[str, bytes]:
    """New ssh host key files (``ssh_host_<type>_key`` and ``.pub``) made with ssh-keygen."""
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="qemukit-hostkeys-") as tmp:
        for key_type in types:
            path = Path(tmp) / f"ssh_host_{key_type}_key"
            try:
                made = run_command(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment,
                                    "-f", str(path)], timeout=30)
            except HostError as exc:
                raise HostError(f"{exc}; install openssh-client to get ssh-keygen") from exc
            if made.returncode != 0:
                raise HostError(f"ssh-keygen -t {key_type} failed (exit {made.returncode}): "
                                f"{made.stderr.strip()}")
            out[path.name] = path.read_bytes()
            out[path.name + ".pub"] = path.with_name(path.name + ".pub").read_bytes()
    return out


def host_key_alias(vm_name: str) -> str:
    """The name a VM's host keys are filed under in its known_hosts (ssh's ``HostKeyAlias``).

    Not ``[127.0.0.1]:PORT``: the forwarded port changes with every start.
    """
    return f"qemukit-{vm_name}"


def write_known_hosts(path: Path, alias: str, public_keys: Sequence[str]) -> None:
    """Write ``path`` (mode 0600, replaced atomically): ``alias`` with each public key line."""
    lines = []
    for line in public_keys:
        words = line.split()
        if len(words) < 2 or not _KEY_RE.fullmatch(" ".join(words[:2])):
            raise HostError(f"not an ssh public key line: {line[:60]!r}")
        lines.append(f"{alias} {words[0]} {words[1]}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.writelines(lines)
    os.replace(tmp, path)


def known_hosts_file(runtime_dir: Path) -> Path | None:
    """The VM's pinned host keys (:data:`KNOWN_HOSTS_FILE`), or None if qemukit knows none."""
    path = runtime_dir / KNOWN_HOSTS_FILE
    return path if path.is_file() and path.stat().st_size > 0 else None


def _host_key_user_data(host_keys: Mapping[str, bytes]) -> bytes:
    """The ``#cloud-config`` part giving the guest ``host_keys`` (every boot, see the module)."""
    ssh_keys: dict[str, str] = {}
    restore = []
    for name, data in sorted(host_keys.items()):
        m = re.fullmatch(r"ssh_host_([a-z0-9]+)_key(\.pub)?", name)
        if m is None:
            raise ValueError(f"not a host key file name: {name!r}")
        ssh_keys[f"{m.group(1)}_{'public' if m.group(2) else 'private'}"] = data.decode()
        mode = "644" if m.group(2) else "600"
        restore.append(f"printf %s {base64.b64encode(data).decode()} | base64 -d > "
                       f"/etc/ssh/{name} && chmod {mode} /etc/ssh/{name}")
    config = {
        "ssh_keys": ssh_keys,
        # ssh_keys is applied once per instance; this puts the same keys back on each boot.
        "bootcmd": [["sh", "-c", "[ -d /etc/ssh ] || exit 0\n" + "\n".join(restore)]],
        "merge_how": [{"name": "list", "settings": ["append"]},
                      {"name": "dict", "settings": ["no_replace", "recurse_list"]}],
    }
    return b"#cloud-config\n" + json.dumps(config, indent=1).encode() + b"\n"


def _combine_user_data(user_data: bytes, ours: bytes) -> bytes | None:
    """The user's user-data and qemukit's part as one MIME multipart, or None if it cannot be.

    The user's bytes go first, base64-encoded as ``text/plain``, which
    cloud-init types by their first line as it does a single user-data (so
    they arrive byte for byte). Already MIME or gzip: None (sent as given).
    """
    head = user_data.lstrip()[:40].lower()
    if user_data.startswith(b"\x1f\x8b") or head.startswith((b"content-type:", b"mime-version:")):
        return None
    outer = MIMEMultipart()
    for data, filename, subtype in ((user_data, "user-data", "plain"),
                                    (ours, "qemukit-host-keys.cfg", "cloud-config")):
        part = MIMENonMultipart("text", subtype)
        part.set_payload(base64.encodebytes(data).decode("ascii"))
        part["Content-Transfer-Encoding"] = "base64"
        part.add_header("Content-Disposition", "attachment", filename=filename)
        outer.attach(part)
    return outer.as_bytes()


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
    # (The host keys are new each start and do not count: bootcmd installs them anyway.)
    digest = hashlib.sha256("\n".join(keys).encode() + b"\0" + user_data).hexdigest()[:10]
    instance_id = f"qemukit-{vm_name}-{digest}"
    host_keys: dict[str, bytes] | None = generate_host_keys(f"root@{hostname}")
    assert host_keys is not None
    ours = _host_key_user_data(host_keys)
    combined = ours if cloud_init.user_data is None else _combine_user_data(user_data, ours)
    if combined is None or re.search(rb"^\s*ssh_keys\s*:", user_data, re.MULTILINE):
        host_keys = None  # the user's own MIME, or host keys: qemukit cannot know the keys
    sent = user_data if combined is None else combined
    known = directory / KNOWN_HOSTS_FILE
    if host_keys is None:
        known.unlink(missing_ok=True)
    else:
        write_known_hosts(known, host_key_alias(vm_name),
                          [v.decode() for k, v in sorted(host_keys.items()) if k.endswith(".pub")])
    iso = directory / SEED_FILE
    write_seed_iso(iso, {"meta-data": meta_data(instance_id, hostname, keys),
                         "user-data": sent})
    return Seed(iso, instance_id, hostname, keys, identity, host_keys)


def _hostname_from(vm_name: str) -> str:
    """A valid host name from a VM name (which may hold '_' and '.')."""
    label = re.sub(r"[^a-z0-9-]", "-", vm_name.lower()).strip("-")[:63]
    return label or "qemukit"


# --------------------------------------------------------------------------- ssh


def ssh_argv(host: str, port: int, user: str, identity: Path | None,
             command: Sequence[str] = (), *, known_hosts: Path | None = None,
             alias: str | None = None, options: Sequence[str] = ()) -> list[str]:
    """The ``ssh`` argv to reach a guest (an argv list: it is exec'd, never run by a shell).

    ``command`` is an argv: each word is quoted for the remote shell
    (``shlex.quote``), so it arrives as given, as with ``exec``; ssh itself
    would join the words with spaces. The user's ssh config is not read and
    agent, X11 and proxy settings are off (:data:`SSH_OPTIONS_SAFE`); only
    ``identity`` is offered (``IdentitiesOnly=yes``; a ``.pub`` file makes
    ssh use the agent's matching key). With ``known_hosts`` (filed under
    ``alias``) the host key must match (``StrictHostKeyChecking=yes``);
    without, it is not checked (:data:`SSH_OPTIONS_THROWAWAY`). ``options``
    come first, so an explicit ``-o`` of the caller wins (ssh keeps the first value).
    """
    argv = ["ssh", *options, "-p", str(port), "-l", user, *SSH_OPTIONS_SAFE,
            "-o", "IdentitiesOnly=yes"]
    if identity is not None:
        argv += ["-i", str(identity)]
    if known_hosts is not None:
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
        if alias is not None:
            argv += ["-o", f"HostKeyAlias={alias}"]
    else:
        argv += list(SSH_OPTIONS_THROWAWAY)
    argv.append(host)
    if command:
        argv += ["--", " ".join(shlex.quote(word) for word in command)]
    return argv


def identity_file(cloud_init: CloudInit | None, runtime_dir: Path) -> Path | None:
    """The private key that logs in to a guest seeded with ``cloud_init``, if qemukit knows it.

    That is the keypair generated into the runtime directory, or the private
    half next to a given ``KEY.pub``, else the ``.pub`` itself (ssh then signs
    with the agent's matching key, and offers no other); None without a seed.
    """
    if cloud_init is None:
        return None
    if cloud_init.ssh_key is None:
        generated = runtime_dir / KEY_FILE
        return generated if generated.is_file() else None
    public = Path(cloud_init.ssh_key)
    private = public.with_suffix("") if public.suffix == ".pub" else None
    if private is not None and private.is_file():
        return private
    return public if public.is_file() else None


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
