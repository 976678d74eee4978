"""qemukit.testing as a user meets it: their own code run against FakeVM and FakeAgent.

The fake must be a VMTarget (checked by mypy through the annotations below),
run qemukit's real hotplug code, keep its state model and events straight,
and let a test make QEMU refuse or answer what the model does not know.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qemukit import HotplugError, VMSpec
from qemukit.errors import QMPCommandError
from qemukit.guest import ExecResult
from qemukit.hotplug import AsyncHotplug
from qemukit.target import VMTarget
from qemukit.testing import FakeAgent, FakeVM

SPEC = VMSpec(kernel="/vmlinuz", cpus=1, max_cpus=2, memory=512, hotplug_ports=2)


async def users_code(vm: VMTarget) -> list[str]:
    """What a user might write: pause, plug a NIC, resume, unplug it; the run states seen."""
    seen = [await vm.status()]
    await vm.pause()
    seen.append(await vm.status())
    hotplug = AsyncHotplug(vm)
    nic = await hotplug.nic(id="net9")
    await vm.resume()
    seen.append(await vm.status())
    await hotplug.unplug(nic)
    return seen


def test_users_hotplug_code_runs_against_the_fake(tmp_path: Path) -> None:
    vm = FakeVM(tmp_path, SPEC)
    target: VMTarget = vm
    assert asyncio.run(users_code(target)) == ["running", "paused", "running"]
    assert vm.mutations == ["stop", "netdev_add", "device_add", "cont", "device_del", "netdev_del"]
    (added,) = vm.commands("device_add")
    assert added["driver"] == "virtio-net-pci" and added["id"] == "net9"
    assert [e["event"] for e in vm.monitor.events] == ["STOP", "RESUME", "DEVICE_DELETED",
                                                       "DEVICE_DELETED"]
    # Unplugged again: only the agent's serial port is left, every port is free.
    assert vm.peripheral == {"vser0": "virtio-serial-pci"}
    assert set(vm.ports.values()) == {None} and vm.netdevs == set()


def test_a_guest_that_refuses_the_unplug_keeps_the_device(tmp_path: Path) -> None:
    vm = FakeVM(tmp_path, SPEC)
    vm.on_unplug = "guest-error"

    async def scenario() -> None:
        hotplug = AsyncHotplug(vm)
        nic = await hotplug.nic(id="net9")
        with pytest.raises(HotplugError):
            await hotplug.unplug(nic, timeout=5)

    asyncio.run(scenario())
    assert "net9" in vm.peripheral


def test_failures_and_unknown_commands_come_back_as_qemu_errors(tmp_path: Path) -> None:
    vm = FakeVM(tmp_path, SPEC)
    vm.fail["query-status"] = "not now"
    with pytest.raises(QMPCommandError, match="not now"):
        asyncio.run(vm.qmp("query-status"))
    with pytest.raises(QMPCommandError, match="query-nothing has not been found"):
        asyncio.run(vm.qmp("query-nothing"))

    def chardevs(args: dict[str, Any]) -> Any:
        return [{"label": "serial0", "filename": "unix:/x"}]

    vm.on_command("query-chardev", chardevs)
    assert asyncio.run(vm.qmp("query-chardev"))[0]["label"] == "serial0"
    assert vm.commands("query-chardev") == [{}]


def test_the_fake_agent_answers_commands_through_the_guarded_guest(tmp_path: Path) -> None:
    def respond(argv: tuple[str, ...]) -> tuple[int, bytes, bytes]:
        return (0, b"6.1.0\n", b"") if argv == ("uname", "-r") else (1, b"", b"no such command")

    agent = FakeAgent(respond)
    vm = FakeVM(tmp_path, SPEC, agent=agent)
    result = asyncio.run(vm.exec(["uname", "-r"]))
    assert isinstance(result, ExecResult) and result.stdout_text == "6.1.0\n"
    assert asyncio.run(vm.guest.exec("false")).exit_status == 1
    assert agent.ran == [("uname", "-r"), ("sh", "-c", "false")]


def test_shutdown_ends_the_fakes_connection(tmp_path: Path) -> None:
    vm = FakeVM(tmp_path, SPEC)

    async def scenario() -> None:
        gone = asyncio.ensure_future(vm.monitor.wait_disconnected())
        await vm.shutdown()
        await asyncio.wait_for(gone, 5)

    asyncio.run(scenario())
    assert not vm.qemu_alive()
    assert "FakeVM 'fake'" in repr(vm)
