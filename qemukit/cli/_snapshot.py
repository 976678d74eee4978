"""The ``qemukit snapshot``, ``save`` and ``restore`` commands (see :mod:`qemukit.snapshot`).

Registered on :func:`qemukit.cli.main` when the CLI module loads (cli.py
imports this module on its last line; that import is kept out of ruff's
import sorting so that mypy checks cli.py, and the type of ``main``,
before this module). Exit
codes are the CLI's one table (``qemukit --help``): 0 success, 1 the
operation was refused or failed (a :class:`~qemukit.errors.SnapshotError`:
the message says why and what to do), 2 a bad TAG, 124 a wait timed out,
125 QEMU itself failed to start.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import errors
from ._common import attach_vm, attached, emit_json
from ._run import foreground

__all__ = ["restore_command", "save_command", "snapshot_command"]

ACTIONS = ("save", "load", "delete", "list", "external", "revert", "commit")


def _print_infos(infos: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json([i.to_dict() for i in infos])
        return
    import time

    click.echo(f"{'TAG':24} {'KIND':9} {'RAM':>9}  {'TAKEN':19}  DEVICES")
    for i in infos:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created)) if i.created else "-"
        ram = f"{i.vm_state_size / 2**20:.1f}M" if i.vm_state_size else "-"
        click.echo(f"{i.tag:24} {i.kind:9} {ram:>9}  {taken:19}  {', '.join(i.devices)}")


@click.command(name="snapshot")
@click.argument("name")
@click.argument("action", type=click.Choice(ACTIONS))
@click.argument("tag", required=False)
@click.option("--memory", is_flag=True, help="external: also save the RAM (revert resumes it).")
@click.option("--replace", is_flag=True, help="save: overwrite a snapshot with the same tag.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds for the snapshot job.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def snapshot_command(name: str, action: str, tag: str | None, memory: bool, replace: bool,
                     timeout: float, as_json: bool) -> None:
    """Snapshots of a running VM: save|load|delete TAG, list, external|revert|commit TAG.

    \b
    save/load/delete  internal snapshots: disks and RAM inside the VM's qcow2 disks
    list              every snapshot; NAME may also be a qcow2 file (a stopped VM's disk)
    external TAG      freeze the disks under new overlays (--memory: RAM too)
    revert TAG        go back to the latest external snapshot
    commit TAG        merge the latest external snapshot into the disks below it
    \b
    Examples:
      qemukit snapshot web save clean
      qemukit snapshot web load clean
      qemukit snapshot web list --json
    A VM that cannot be snapshotted (raw or pflash disk, a device that blocks
    migration) is refused with the reason and what to do, before anything changes.
    """
    from ..snapshot import check_tag, image_snapshots

    if action == "list":
        if tag is not None:
            raise click.BadParameter("list takes no TAG", param_hint="TAG")
        if os.path.isfile(name):
            _print_infos(image_snapshots(name), as_json)
            return
    elif tag is None:
        raise click.UsageError(f"{action} needs a TAG")
    else:
        try:
            check_tag(tag)
        except errors.SnapshotError as exc:
            raise click.BadParameter(str(exc), param_hint="TAG") from exc
    with attached(name) as vm:
        snaps = vm.snapshots
        result: Any = None
        if action == "list":
            _print_infos(snaps.list(), as_json)
            return
        assert tag is not None
        if action == "save":
            result = snaps.save(tag, replace=replace, timeout=timeout)
        elif action == "load":
            snaps.load(tag, timeout=timeout)
        elif action == "delete":
            snaps.delete(tag, timeout=timeout)
        elif action == "external":
            result = snaps.external(tag, memory=memory, timeout=timeout)
        elif action == "revert":
            snaps.revert(tag, timeout=timeout)
        else:
            snaps.commit(tag, timeout=timeout)
    if as_json:
        emit_json({"name": name, "action": action, "tag": tag,
                    "snapshot": result.to_dict() if result is not None else None})
    else:
        click.echo(f"{name}: {action} {tag}: done")


@click.command(name="save")
@click.argument("name")
@click.argument("bundle", type=click.Path(dir_okay=True, file_okay=False))
@click.option("--keep-running", is_flag=True,
              help="Let the guest run on after saving instead of stopping the VM.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for writing the state and copying the disks.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def save_command(name: str, bundle: str, keep_running: bool, timeout: float,
                 as_json: bool) -> None:
    """Save a running VM's live state to BUNDLE (a new directory), then stop the VM.

    Like 'virsh save': QEMU quits once the state (RAM, devices, a copy of each
    writable disk's top layer, the spec) is safely on disk; --keep-running
    resumes the guest instead. 'qemukit restore BUNDLE' starts it again where
    it was, without booting, as many times as you like.
    """
    vm = attach_vm(name)
    try:
        saved = vm.save_state(bundle, stop=not keep_running, timeout=timeout)
    except BaseException:
        if vm.state.value == "running":
            vm.detach()
        raise
    if keep_running:
        vm.detach()
    if as_json:
        emit_json({"name": name, "bundle": str(saved.path), "stopped": not keep_running,
                    "state_size": saved.manifest.get("state_size")})
    else:
        click.echo(str(saved.path))


@click.command(name="restore")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--name", help="Name of the clone (generated when omitted).")
@click.option("--detach", "-d", is_flag=True,
              help="Leave the clone running in the background and print its name.")
@click.option("--wait", "wait_for", type=click.Choice(["qmp", "agent"]), default="qmp",
              show_default=True, help="With --detach: return once restored, or once the agent answers.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for loading the state.")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print the result as JSON.")
def restore_command(bundle: str, name: str | None, detach: bool, wait_for: str, timeout: float,
                    as_json: bool) -> None:
    """Start a clone of the VM saved in BUNDLE: it resumes where it was saved, without booting.

    Each clone runs on its own overlay over the bundle's disk copies, so
    several can run side by side and the bundle is never written. Without
    --detach the clone runs in the foreground with its console on stdout
    until the guest powers off or Ctrl-C.
    """
    from ..vm import VM

    vm = VM.restore(bundle, name=name, timeout=timeout, die_with_parent=not detach,
                    boot_timeout=timeout)
    if not detach:
        foreground(vm)
        return
    try:
        if wait_for == "agent":
            vm.wait_ready(timeout)
    except BaseException:
        vm.kill()  # a detached clone nobody knows the name of yet
        raise
    clone, pid = vm.name, vm.pid
    vm.detach()
    if as_json:
        emit_json({"name": clone, "pid": pid, "bundle": bundle})
    else:
        click.echo(clone)
    sys.stdout.flush()


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (snapshot_command, save_command, restore_command,)
