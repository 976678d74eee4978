"""The registry's listing against fake runtime entries (no QEMU): entries that vanish mid-listing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from qemukit import registry
from qemukit.state import RuntimeDir, VMInfo, list_entries


def _fake_entry(root: Path, name: str) -> Path:
    """A runtime entry whose 'QEMU' is this test process (alive, same start time)."""
    me = psutil.Process()
    path = root / name
    path.mkdir(parents=True, mode=0o700)
    info = {"name": name, "pid": me.pid, "start_time": me.create_time(), "accel": "tcg",
            "accel_reason": "test", "owner_pid": me.pid, "die_with_parent": False,
            "created": 1.0, "argv": ["qemu-system-x86_64"], "owner_start_time": me.create_time()}
    (path / "vm.json").write_text(json.dumps(info))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    for name in ("a", "b", "c"):
        _fake_entry(root, name)
    return root


def test_all_entries_listed(root: Path) -> None:
    vms = registry.list_vms(root, query=False)
    assert [(v.name, v.state, v.alive) for v in vms] == [("a", "alive", True), ("b", "alive", True),
                                                         ("c", "alive", True)]


def test_entry_removed_before_its_vm_json_is_read(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_info = RuntimeDir.read_info

    def racing_read(self: RuntimeDir) -> VMInfo | None:
        if self.name == "b":  # another process stops VM b right after the directory listing
            shutil.rmtree(self.path)
        return read_info(self)

    monkeypatch.setattr(RuntimeDir, "read_info", racing_read)
    assert [v.name for v in registry.list_vms(root, query=False)] == ["a", "c"]


def test_entry_removed_while_its_row_is_made(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def listed_then_removed(state_root: Path | None = None) -> list[tuple[RuntimeDir, VMInfo | None]]:
        entries = list_entries(state_root)
        shutil.rmtree(root / "b")  # vm.json was read; then the VM stopped and its entry went
        return entries

    monkeypatch.setattr(registry, "list_entries", listed_then_removed)
    assert [v.name for v in registry.list_vms(root, query=True)] == ["a", "c"]


def test_incomplete_and_dead_entries_still_show(root: Path) -> None:
    (root / "b" / "vm.json").unlink()  # a launch still setting its entry up
    info = json.loads((root / "c" / "vm.json").read_text())
    (root / "c" / "vm.json").write_text(json.dumps({**info, "start_time": 1.0}))  # pid reused
    rows = {v.name: v.state for v in registry.list_vms(root, query=False)}
    assert rows == {"a": "alive", "b": "incomplete", "c": "gone"}


def test_real_race_with_a_process_removing_entries(tmp_path: Path) -> None:
    """Entries that another process keeps adding and removing never show as bogus rows."""
    import subprocess
    import sys

    root, staging = tmp_path / "race", tmp_path / "staging"
    root.mkdir()
    staging.mkdir()
    keeper = _fake_entry(root, "keeper")
    template = (keeper / "vm.json").read_text()
    # Each entry appears complete (renamed into place with its vm.json) and disappears whole
    # (renamed away, then deleted), so the only rows it may give are 'alive' ones: an
    # 'incomplete' row would be an entry that vanished between the listing and the read.
    # Names are not reused: a new VM taking a vanished one's name is another story.
    churn = subprocess.Popen([sys.executable, "-c", f"""
import os, shutil
root, staging, template = {str(root)!r}, {str(staging)!r}, {template!r}
for i in range(1500):
    tmp = os.path.join(staging, "e")
    os.mkdir(tmp)
    with open(os.path.join(tmp, "vm.json"), "w") as fh:
        fh.write(template)
    os.rename(tmp, os.path.join(root, f"churn{{i}}"))
    if i >= 10:
        os.rename(os.path.join(root, f"churn{{i - 10}}"), os.path.join(staging, "gone"))
        shutil.rmtree(os.path.join(staging, "gone"))
"""])
    seen: set[str] = set()
    try:
        while churn.poll() is None:
            states = {v.name: v.state for v in registry.list_vms(root, query=False)}
            assert states.pop("keeper") == "alive"
            seen |= set(states.values())
    finally:
        churn.kill()
        churn.wait()
    assert churn.returncode == 0
    assert seen == {"alive"}
