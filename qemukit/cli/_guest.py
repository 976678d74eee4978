"""``qemukit ssh`` and the guest-facing options of ``qemukit run`` (seed, keep, wait).

Registered on :func:`qemukit.cli.main` when the CLI module loads.
``qemukit ssh NAME [-- CMD...]`` replaces itself with ``ssh`` (an argv list,
no shell) logged in through the VM's 127.0.0.1 port forward with the key
its cloud-init seed authorized, offering no other; the host keys qemukit
gave the guest are pinned (``known_hosts`` in the VM's runtime directory);
the user's ssh config is not read, so the untrusted guest gets no agent or
X11 forwarding. Each word of CMD reaches the guest intact.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
from pathlib import Path
from typing import Any

import click

from .. import errors
from ..spec import CloudInit, Drive, VMSpec
from ._common import attached, name_argument

__all__ = [
    "apply_run_options", "apply_seed_options", "image_summary", "keep_disks", "kept_dir",
    "ssh_command", "warn_unpinned",
]


def kept_dir() -> Path:
    """Where ``--keep`` keeps disks: ``$XDG_DATA_HOME/qemukit/disks`` (``~/.local/share/...``)."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "qemukit" / "disks"


def apply_seed_options(spec: VMSpec, user_data: str | None, ssh_key: str | None) -> VMSpec:
    """``--user-data FILE`` and ``--ssh-key FILE``: set them on the spec's seed (adding one if needed)."""
    if user_data is None and ssh_key is None:
        return spec
    seed = spec.cloud_init or CloudInit()
    changes: dict[str, str] = {}
    if user_data is not None:
        changes["user_data"] = os.path.abspath(user_data)
    if ssh_key is not None:
        changes["ssh_key"] = os.path.abspath(ssh_key)
    return spec.replace(cloud_init=dataclasses.replace(seed, **changes))


def keep_disks(spec: VMSpec) -> tuple[VMSpec, Path]:
    """``--keep``: give each throwaway drive a persistent overlay in ``kept_dir()/NAME/``.

    The base stays untouched (the overlay is a qcow2 whose backing file
    QEMU opens read-only). The overlay is made once and booted again by the
    next ``--keep`` run of the same name; a generated ssh key is kept there
    too, so the guest (which cloud-init set up once) still accepts it.
    Delete the directory to throw the VM away.
    """
    from .. import host
    from .._launch.argv import drive_ids
    from .._launch.seed import generate_keypair

    name = spec.name or f"vm-{secrets.token_hex(3)}"
    directory = kept_dir() / name
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise errors.StateError(
            f"cannot keep disks in {directory} (--keep): {exc.strerror or exc}; "
            "set XDG_DATA_HOME to a directory you can write") from exc
    qemu = host.find_qemu(spec.arch)
    host.find_qemu_img(qemu)  # before any overlay is begun
    drives = []
    for drive, dev_id in zip(spec.drives, drive_ids(spec), strict=True):
        if not drive.overlay:
            drives.append(drive)
            continue
        overlay = directory / f"{dev_id}.qcow2"
        base = os.path.abspath(drive.file)
        stamp = directory / f"{dev_id}.base"
        image = host.resolve_disk(drive, qemu)
        if not overlay.exists():
            host.create_overlay(qemu, base, image.format, overlay, size=image.virtual_size,
                                unsafe=True)
            stamp.write_text(_base_stamp(base))
        elif stamp.exists() and stamp.read_text() != _base_stamp(base):
            # An overlay only makes sense over the very base it was made on.
            raise errors.StateError(f"{base} changed (rebuilt?) since {overlay} was made over it: "
                                    f"delete {directory} to start afresh")
        # The kept overlay's backing chain is named, so the start opens exactly it.
        chain = ((base, image.format), *image.backing)
        drives.append(Drive(str(overlay), format="qcow2", interface=drive.interface, id=drive.id,
                            backing=tuple(f"{fmt}:{path}" for path, fmt in chain)))
    changes: dict[str, object] = {"name": name, "drives": tuple(drives)}
    if spec.cloud_init is not None and spec.cloud_init.ssh_key is None:
        key = directory / "ssh_key"
        public = key.with_name("ssh_key.pub")
        if not public.exists():
            generate_keypair(key, f"qemukit@{name}")
        changes["cloud_init"] = dataclasses.replace(spec.cloud_init, ssh_key=str(public))
    return spec.replace(**changes), directory


def apply_run_options(spec: VMSpec, opts: dict[str, Any]) -> VMSpec:
    """``run``'s ``--keep`` applied to the resolved spec (``--user-data`` and ``--ssh-key``
    are part of the request: :func:`qemukit.cli.build_request`)."""
    if opts.get("keep"):
        spec, directory = keep_disks(spec)
        click.echo(f"qemukit: {spec.name}: disk changes are kept in {directory} (boot them again "
                   f"with --name {spec.name} --keep; delete the directory to discard them)",
                   err=True)
    return spec


def image_summary(image: Any) -> dict[str, Any]:
    """What ``images build`` reports about a disk image: its file, size and build time."""
    disk = getattr(image, "disk", None)
    if disk is None:
        return {}
    manifest = getattr(image, "manifest", {})
    return {"disk": str(disk), "disk_bytes": disk.stat().st_size,
            "build_seconds": manifest.get("build_seconds"),
            "packages": manifest.get("packages"), "kernel_release": image.kernel_release}


def _base_stamp(path: str) -> str:
    """Size and modification time of a base image: enough to see that it was replaced."""
    st = os.stat(path)
    return f"{path}\n{st.st_size}\n{st.st_mtime_ns}\n"


@click.command(name="ssh", context_settings={"ignore_unknown_options": True})
@name_argument
@click.option("-l", "--user", help="Log in as USER (default: the seed's user, 'debian').")
@click.option("--print", "print_only", is_flag=True,
              help="Print the ssh command line instead of running it.")
@click.option("-o", "--option", "ssh_options", multiple=True, metavar="KEY=VALUE",
              help="An ssh -o option, which wins over qemukit's (e.g. ForwardAgent=yes if you "
              "trust the guest); repeatable.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh_command(name: str, user: str | None, print_only: bool, ssh_options: tuple[str, ...],
                command: tuple[str, ...]) -> None:
    """Log in to a running VM over ssh, or run CMD there: qemukit ssh NAME [-- CMD...].

    \b
    Goes through the VM's port forward to guest port 22 on 127.0.0.1, with
    the key its cloud-init seed authorized (generated per VM unless
    --ssh-key was given to run) and no other. The guest's host key is
    checked against the one qemukit gave it; your ~/.ssh/config is not
    read (no agent or X11 forwarding, no ProxyCommand) unless you pass -o.
    Each word of CMD arrives as one argument, as with exec. Exits with
    ssh's status (the command's, or 255 if ssh itself failed).
    """
    with attached(name) as vm:
        argv = vm.ssh_argv(list(command), user=user,
                           options=[w for opt in ssh_options for w in ("-o", opt)])
    warn_unpinned(name, argv)
    if print_only:
        click.echo(shlex.join(argv))
        return
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise errors.HostError(
            f"cannot run {argv[0]}: {exc.strerror}; install openssh-client") from exc


def warn_unpinned(name: str, argv: list[str]) -> None:
    """Say so on stderr when ``argv`` cannot check the guest's host key (qemukit knows none)."""
    if "StrictHostKeyChecking=no" in argv:
        click.echo(f"qemukit: {name}: the guest's host key is unknown to qemukit (no seed it "
                   "made, or user-data of its own that sets host keys or is MIME): "
                   "not checked", err=True)


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (ssh_command,)
