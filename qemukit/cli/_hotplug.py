"""``qemukit hotplug``, ``unplug``, ``devices``, ``pause``, ``resume``: live changes to running VMs.

They work on VMs started with ``qemukit run --detach --name NAME`` (or any
VM with a runtime entry), attach over the shared QMP socket, and let go of
the VM afterwards. Exit codes are the CLI's one table (``qemukit --help``):
0 done, 1 refused or failed (a :class:`~qemukit.errors.HotplugError`: the
message says why and what is left, e.g. the guest did not release a device
in time), 124 QEMU itself did not answer in time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from ..timeouts import PLUG_TIMEOUT, UNPLUG_TIMEOUT
from ._common import attached, emit_json, name_argument

if TYPE_CHECKING:
    from ..hotplug import PluggedDevice


def _with_vm(name: str, action: Callable[[Any], Any]) -> Any:
    """Attach to ``name``, run ``action(vm)``, always let go of the VM."""
    with attached(name) as vm:
        return action(vm)


def _print_plugged(devices: Sequence[PluggedDevice], as_json: bool) -> None:
    if as_json:
        data = [d.to_dict() for d in devices]
        emit_json(data[0] if len(data) == 1 else data)
        return
    for device in devices:
        click.echo(device.id)


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(func)


def _timeout_option(default: float) -> Callable[[Any], Any]:
    return click.option("--timeout", type=float, default=default, show_default=True,
                        help="Seconds to wait for QEMU and the guest.")


@click.group(name="hotplug")
@name_argument
@click.pass_context
def hotplug_group(ctx: click.Context, name: str) -> None:
    """Plug a disk, NIC, CPUs or memory into the running VM NAME; prints the new device's id.

    \b
    Examples:
      qemukit hotplug vm1 disk scratch.qcow2 --id scratch
      qemukit hotplug vm1 nic --hostfwd 2222:22
      qemukit hotplug vm1 cpu 2
      qemukit hotplug vm1 memory 512M
    Nothing changes when a check fails (no free port or slot, beyond
    max_cpus/max_memory, missing file, wrong format, id in use): exit 1.
    """
    ctx.obj = name


@hotplug_group.command(name="disk")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--id", "device_id", help="Device id (default: disk0, disk1...).")
@click.option("--format", "image_format", type=click.Choice(["qcow2", "raw"]),
              help="Expected image format (default: what qemu-img detects).")
@click.option("--readonly", is_flag=True, help="Plug the disk read-only.")
@click.option("--overlay", is_flag=True,
              help="Plug a throwaway qcow2 overlay; the image itself is never written.")
@click.option("--interface", type=click.Choice(["virtio-blk", "virtio-scsi", "nvme"]),
              default="virtio-blk", show_default=True)
@_timeout_option(PLUG_TIMEOUT)
@_json_option
@click.pass_obj
def hotplug_disk(name: str, path: str, device_id: str | None, image_format: Any, readonly: bool,
                 overlay: bool, interface: Any, timeout: float, as_json: bool) -> None:
    """Plug the image PATH (qcow2 or raw) as a disk."""
    device = _with_vm(name, lambda vm: vm.hotplug.disk(
        path, format=image_format, read_only=readonly, overlay=overlay, interface=interface,
        id=device_id, timeout=timeout))
    _print_plugged([device], as_json)


@hotplug_group.command(name="nic")
@click.option("--hostfwd", "forwards", multiple=True, metavar="[tcp|udp:][ADDR:]HOST:GUEST",
              help="Forward a host port to the guest (user networking; repeatable).")
@click.option("--tap", "ifname", metavar="IFNAME", help="Use this existing tap device instead.")
@click.option("--mac", help="MAC address (default: a random 52:54:00:xx:xx:xx).")
@click.option("--id", "device_id", help="Device id (default: net0, net1...).")
@_timeout_option(PLUG_TIMEOUT)
@_json_option
@click.pass_obj
def hotplug_nic(name: str, forwards: tuple[str, ...], ifname: str | None, mac: str | None,
                device_id: str | None, timeout: float, as_json: bool) -> None:
    """Plug a virtio-net NIC (user-mode networking unless --tap)."""
    kind = "tap" if ifname else "user"
    device = _with_vm(name, lambda vm: vm.hotplug.nic(
        forwards=forwards, kind=kind, ifname=ifname, mac=mac, id=device_id, timeout=timeout))
    _print_plugged([device], as_json)


@hotplug_group.command(name="cpu")
@click.argument("count", type=int, default=1, required=False)
@_timeout_option(PLUG_TIMEOUT)
@_json_option
@click.pass_obj
def hotplug_cpu(name: str, count: int, timeout: float, as_json: bool) -> None:
    """Plug COUNT vCPUs (default 1); the VM needs --max-cpus above --cpus."""
    devices = _with_vm(name, lambda vm: vm.hotplug.cpu(count, timeout=timeout))
    _print_plugged(devices, as_json)


@hotplug_group.command(name="memory")
@click.argument("size")
@_timeout_option(PLUG_TIMEOUT)
@_json_option
@click.pass_obj
def hotplug_memory(name: str, size: str, timeout: float, as_json: bool) -> None:
    """Plug a DIMM of SIZE, such as 256M or 1G (a multiple of 128M); the VM needs --max-memory."""
    device = _with_vm(name, lambda vm: vm.hotplug.memory(size, timeout=timeout))
    _print_plugged([device], as_json)


@click.command()
@name_argument
@click.argument("device_id", metavar="ID")
@_timeout_option(UNPLUG_TIMEOUT)
def unplug(name: str, device_id: str, timeout: float) -> None:
    """Unplug the hot-plugged device ID from VM NAME; returns once it and its backend are gone.

    Exits 1 if the guest refuses or does not release it within --timeout;
    the device then stays plugged (see 'qemukit devices').
    """
    _with_vm(name, lambda vm: vm.unplug(device_id, timeout=timeout))
    click.echo(f"{device_id}: unplugged")


@click.command()
@name_argument
@_json_option
def devices(name: str, as_json: bool) -> None:
    """List the devices hot-plugged into VM NAME that are still plugged."""
    found: list[PluggedDevice] = _with_vm(name, lambda vm: vm.devices())
    if as_json:
        emit_json([d.to_dict() for d in found])
        return
    click.echo(f"{'ID':12} {'KIND':10} {'DRIVER':20} {'BUS':8} BACKENDS")
    for d in found:
        click.echo(f"{d.id:12} {d.kind:10} {d.driver:20} {d.bus or '-':8} "
                   f"{', '.join(d.backends) or '-'}" + (f" (overlay {d.overlay})" if d.overlay else ""))


@click.command()
@name_argument
def pause(name: str) -> None:
    """Pause VM NAME's vCPUs (returns once QEMU reports STOP)."""
    _with_vm(name, lambda vm: vm.pause())
    click.echo(f"{name}: paused")


@click.command()
@name_argument
def resume(name: str) -> None:
    """Resume the paused VM NAME (returns once QEMU reports RESUME)."""
    _with_vm(name, lambda vm: vm.resume())
    click.echo(f"{name}: running")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (hotplug_group, unplug, devices, pause, resume,)
