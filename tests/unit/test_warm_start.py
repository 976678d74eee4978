"""The warm start's steps against a fake target (no QEMU): choose, build, finish, and why it
boots cold when a state is outdated, cannot be saved or cannot be loaded.

The behaviour itself is tested against real QEMU in tests/integration/test_warm.py and
tests/integration/test_warm_mapped.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qemukit import Drive, VMSpec
from qemukit._wire.agent import ExecResult
from qemukit.errors import LaunchError, SnapshotError, StateError
from qemukit.snapshot import Bundle
from qemukit.snapshot._bundle import private_ram_args, shared_ram_args, without_ram_args
from qemukit.vm import _warm
from qemukit.warm import WarmCache
from tests.unit.warm_inputs import FACTS, qemu


@pytest.fixture(autouse=True)
def mapped_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mapped restores on, whatever the default and the caller's environment."""
    monkeypatch.setenv(_warm.MAP_ENV, "1")


def tiny(files: dict[str, Path], **changes: Any) -> VMSpec:
    return VMSpec(kernel=files["vmlinuz"], initrd=files["initrd"], memory=128, warm=True,
                  drives=(Drive(files["disk.raw"], format="raw", overlay=True),)).replace(**changes)


class FakeBuilder:
    """A builder VM: 'boots' at once and writes a bundle as save_state would."""

    def __init__(self, spec: VMSpec, qemu_version: str, save_error: Exception | None) -> None:
        self.spec = spec
        self.console_log: Path | None = None
        self.qemu_version = qemu_version
        self.save_error = save_error
        self.calls: list[Any] = []

    async def start(self) -> object:
        self.calls.append("start")
        return self

    async def wait_ready(self, timeout: float | None = None) -> float:
        return 0.0

    async def wait_ssh(self, timeout: float | None = None) -> float:
        return 0.0

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = 1.0, **kwargs: Any) -> Any:
        self.calls.append((command, kwargs))
        return {}

    async def save_state(self, path: str | Path, *, stop: bool = False,
                         timeout: float = 1.0) -> Bundle:
        self.calls.append("save")
        if self.save_error is not None:
            raise self.save_error
        path = Path(path)
        path.mkdir()
        (path / "state.bin").write_bytes(b"QEVM")
        self.spec.dump(path / "spec.toml")
        (path / "manifest.json").write_text(json.dumps(
            {"format": 1, "qemu": self.qemu_version, "guest": "running", "disks": []}))
        if any(arg.startswith("memory-backend-file,") for arg in self.spec.extra_args):
            (path.parent / _warm.RAM_FILE).write_bytes(b"\0" * 4096)  # QEMU made it
        return Bundle.open(path)

    async def kill(self) -> object:
        self.calls.append("kill")
        if "save" in self.calls:
            raise StateError("stopped already")
        return None


class FakeMonitor:
    def listen(self, *names: str) -> Any:
        raise AssertionError("not reached in these tests")


class FakeTarget:
    """The VM being started: records what the warm start asks of it."""

    def __init__(self, spec: VMSpec, *, qemu_version: str = "7.2.0",
                 save_error: Exception | None = None, qmp_error: Exception | None = None,
                 exec_status: int = 0) -> None:
        self.spec = spec
        self.name = "clone"
        self.runtime = None
        self.accel = None
        self.boot_timeout = 5.0
        self.monitor = FakeMonitor()
        self.guest_booted = True
        self.has_agent = True
        self.guest = SimpleNamespace(call=self._guest_call)
        self.qemu_version = qemu_version
        self.save_error = save_error
        self.qmp_error = qmp_error
        self.exec_status = exec_status
        self.builders: list[FakeBuilder] = []
        self.calls: list[Any] = []

    def warm_builder(self, spec: VMSpec) -> FakeBuilder:
        builder = FakeBuilder(spec, self.qemu_version, self.save_error)
        self.builders.append(builder)
        return builder

    async def _guest_call(self, command: str, arguments: dict[str, Any] | None = None, *,
                          timeout: float = 1.0) -> Any:
        self.calls.append(command)

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = 1.0, **kwargs: Any) -> Any:
        self.calls.append((command, kwargs))
        if self.qmp_error is not None:
            raise self.qmp_error
        return {}

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 1.0,
                   check: bool = False, stdin: bytes | None = None) -> ExecResult:
        self.calls.append("exec")
        return ExecResult(tuple(command), self.exec_status, b"", b"no /run", 0.01)

    def operation_lock(self, timeout: float = 1.0) -> Any:
        @contextlib.asynccontextmanager
        async def held() -> AsyncIterator[None]:
            yield

        return held()

    async def wait_ready(self, timeout: float | None = None) -> float:
        return 0.0

    async def resume(self) -> None:
        self.calls.append("resume")


def choose(vm: FakeTarget, spec: VMSpec, files: dict[str, Path], cache: WarmCache,
           version: tuple[int, int, int] = (7, 2, 0)) -> tuple[Any, Any]:
    return asyncio.run(_warm.choose_warm(vm, spec, qemu(files["qemu"], version),  # type: ignore[arg-type]
                                         FACTS, cache=cache))


def test_a_first_start_builds_a_mapped_state_and_restores_from_it(
        files: dict[str, Path], tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm")
    vm = FakeTarget(tiny(files))
    start, plan = choose(vm, vm.spec, files, cache)
    assert plan is not None and plan.mapped and not start.warm
    assert "first start of this spec" in start.reason and start.memory == "memory mapped"
    (builder,) = vm.builders
    # The builder's RAM is the entry's file, shared; the state leaves it out.
    template = [a for a in builder.spec.extra_args if a.startswith("memory-backend-file,")]
    assert len(template) == 1 and "share=on" in template[0] and "size=128M" in template[0]
    ignore = ("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    assert builder.calls.index(ignore) < builder.calls.index("save")
    # The clone maps the bundle's file privately, and only that: no trace of the builder's.
    ram = plan.bundle.ram_file
    assert ram == plan.entry.bundle_path / "ram" and ram.is_file()
    assert not (plan.entry.path / _warm.RAM_FILE).exists()
    clone_ram = [a for a in plan.spec.extra_args if a.startswith("memory-backend-file,")]
    assert clone_ram == [f"memory-backend-file,id=qemukit-ram,size=128M,mem-path={ram},share=off"]
    assert plan.spec.extra_args.count("memory-backend=qemukit-ram") == 1
    assert "vmgenid,guid=auto" in plan.spec.extra_args
    # Next time the entry is found: warm, nothing built.
    again, plan2 = choose(FakeTarget(tiny(files)), vm.spec, files, cache)
    assert again.warm and plan2 is not None and plan2.entry.key == plan.entry.key


def test_a_failure_after_the_hold_releases_it(files: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_warm raising after cache.hold() closes the hold: the entry is not left in use."""
    from qemukit.snapshot import Bundle

    cache = WarmCache(tmp_path / "warm")
    vm = FakeTarget(tiny(files))
    _, plan = choose(vm, vm.spec, files, cache)
    assert plan is not None and plan.hold is not None
    plan.hold.close()
    assert not cache.in_use(plan.entry)

    def broken(*args: object, **kwargs: object) -> VMSpec:
        raise OSError("clone_spec failed")

    monkeypatch.setattr(Bundle, "clone_spec", broken)
    with pytest.raises(OSError, match="clone_spec failed"):
        choose(FakeTarget(tiny(files)), vm.spec, files, cache)
    assert not cache.in_use(plan.entry)


def test_qemu_8_2_maps_the_template_read_only(tmp_path: Path) -> None:
    args = private_ram_args(128, tmp_path / "ram", (8, 2, 0))
    assert "share=off,readonly=on,rom=off" in args[1]
    assert "readonly" not in private_ram_args(128, tmp_path / "ram", (7, 2, 22))[1]


def test_a_comma_in_the_cache_path_is_quoted() -> None:
    args = shared_ram_args(128, Path("/c,d/ram"))
    assert "mem-path=/c,,d/ram," in args[1]
    assert without_ram_args(("-x", *args, "-device", "vmgenid")) == ("-x", "-device", "vmgenid")


@pytest.mark.parametrize(("extra", "words"), [
    (("-device", "virtio-balloon-pci,free-page-reporting=on"), "virtio-balloon"),
    (("-device", "virtio-mem-pci,memdev=m0"), "virtio-mem"),
    (("-chardev", "socket,id=c,path=/s", "-device", "vhost-user-blk-pci,chardev=c"), "vhost-user"),
    (("-numa", "node,memdev=m"), "RAM backend"),
])
def test_what_cannot_map_its_ram_copies_it_and_says_why(
        files: dict[str, Path], tmp_path: Path, extra: tuple[str, ...], words: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spec = tiny(files, extra_args=extra)
    assert words in (_warm.mapping_refusal(spec) or "")
    vm = FakeTarget(spec)
    with caplog.at_level(logging.INFO, logger="qemukit.warm"):
        start, plan = choose(vm, spec, files, WarmCache(tmp_path / "warm"))
    assert plan is not None and not plan.mapped
    assert start.memory.startswith("memory copied: ") and words in start.memory
    assert not any(a.startswith("memory-backend-file") for a in vm.builders[0].spec.extra_args)
    assert plan.bundle.ram_file is None
    assert not any("x-ignore-shared" in str(c) for c in vm.builders[0].calls)
    assert any(words in r.getMessage() for r in caplog.records)


def test_mapped_and_copied_states_are_different_entries(
        files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = WarmCache(tmp_path / "warm")
    _, mapped = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    monkeypatch.setenv(_warm.MAP_ENV, "0")
    start, copied = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    assert mapped is not None and copied is not None
    assert mapped.entry.key != copied.entry.key and not copied.mapped
    assert "QEMUKIT_WARM_MAP=0" in start.memory


def test_a_state_saved_by_another_qemu_is_removed_and_the_vm_boots(
        files: dict[str, Path], tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm")
    vm = FakeTarget(tiny(files), qemu_version="7.1.0")  # the builder's QEMU
    start, plan = choose(vm, vm.spec, files, cache)
    assert plan is None and not start.warm
    assert "was unusable and is removed" in start.reason and "7.1.0" in start.reason
    assert cache.entries() == []


def test_a_mapped_state_without_its_ram_file_is_removed(files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm")
    _, plan = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    assert plan is not None and plan.mapped
    assert plan.bundle.ram_file is not None
    plan.bundle.ram_file.unlink()
    start, again = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    # The first clone still holds the entry: it stays, and the reason says so.
    assert again is None and "ram is missing" in start.reason and "in use" in start.reason
    assert cache.entries() != []
    assert plan.hold is not None
    plan.hold.close()  # that clone has ended
    start, again = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    assert again is None and "is removed" in start.reason and cache.entries() == []


def test_a_state_qemu_cannot_save_boots_every_time(files: dict[str, Path],
                                                   tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm")
    vm = FakeTarget(tiny(files), save_error=SnapshotError("a vfio device blocks migration"))
    start, plan = choose(vm, vm.spec, files, cache)
    assert plan is None and not start.warm
    assert "cannot save this VM's state" in start.reason and "vfio" in start.reason
    assert vm.builders[0].calls[-1] == "kill"  # the builder is stopped
    assert cache.entries() == [] and list(cache.root.glob(".tmp-*")) == []


def test_a_builder_that_fails_otherwise_fails_the_start_and_leaves_nothing(
        files: dict[str, Path], tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm")
    vm = FakeTarget(tiny(files), save_error=LaunchError("QEMU exited"))
    with pytest.raises(LaunchError):
        choose(vm, vm.spec, files, cache)
    assert vm.builders[0].calls[-1] == "kill"
    assert cache.entries() == [] and list(cache.root.glob(".tmp-*")) == []


def test_a_spec_that_cannot_start_warm_builds_nothing(files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    vm = FakeTarget(tiny(files, agent="none"))
    start, plan = choose(vm, vm.spec, files, WarmCache(tmp_path / "warm"))
    assert plan is None and "agent" in start.reason and vm.builders == []


@pytest.mark.parametrize("error", [LaunchError("QEMU exited: Unknown migration capability"),
                                   SnapshotError("the migration failed")])
def test_a_state_qemu_cannot_load_is_removed_and_says_why(
        files: dict[str, Path], tmp_path: Path, error: Exception) -> None:
    cache = WarmCache(tmp_path / "warm")
    _, plan = choose(FakeTarget(tiny(files)), tiny(files), files, cache)
    assert plan is not None
    clone = FakeTarget(plan.spec, qmp_error=error)
    with pytest.raises(SnapshotError) as failed:
        asyncio.run(_warm.finish_warm(clone, plan))  # type: ignore[arg-type]
    assert plan.entry.key in str(failed.value)
    assert str(error).split(":")[0] in str(failed.value)
    assert cache.entries() != []  # the clone's QEMU may still hold it: removed after it ends
    assert "is removed, so the next start boots" in _warm.discard(plan)
    assert cache.entries() == []
    assert "exec" not in clone.calls  # nothing ran in a guest that was never loaded


def test_a_failed_clock_and_reseed_fails_the_start(files: dict[str, Path]) -> None:
    vm = FakeTarget(tiny(files), exec_status=4)
    with pytest.raises(StateError, match="clock_settime failed: no /run"):
        asyncio.run(_warm.set_guest_clock(vm))  # type: ignore[arg-type]


def test_qemu_guest_agent_sets_the_time_and_a_failed_reseed_is_only_logged(
        files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    vm = FakeTarget(tiny(files, agent="qga"), exec_status=3)
    with caplog.at_level(logging.WARNING, logger="qemukit"):
        asyncio.run(_warm.set_guest_clock(vm))  # type: ignore[arg-type]
    assert vm.calls[0] == "guest-set-time"
    assert any("RNDRESEEDCRNG" in r.getMessage() for r in caplog.records)


def test_the_boot_log_goes_after_what_the_clone_printed(tmp_path: Path) -> None:
    console, boot = tmp_path / "console.log", tmp_path / "boot.log"
    console.write_bytes(b"resumed\n")
    boot.write_bytes(b"Linux version 6.1\nready\n")
    _warm.append_boot_log(console, boot)
    text = console.read_bytes()
    assert text.startswith(b"resumed\n") and b"ready\n" in text
    _warm.append_boot_log(console, tmp_path / "gone.log")  # an old entry: nothing to add
    assert console.read_bytes() == text
