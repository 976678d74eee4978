"""Host probing without QEMU: the /dev/kvm access advice and the short accelerator verdict.

``/dev/kvm``, its owner and the host's groups are faked (only for that path),
so each branch is checked whatever the machine running the tests looks like.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import resource
import shutil
import stat
from typing import Any

import pytest

from qemukit import HostError, Share, host
from qemukit.host import _kvm, _virtiofsd
from qemukit.host._fsguard import guard_prefix
from qemukit.host._qemu import write_cache

HANG_REASON = (
    "-cpu host: QEMU exited with status -6 (qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: "
    "kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.); QEMU starts under "
    "KVM (-cpu host,-arch-capabilities) but the guest did not reach its init within 8s "
    "(this host's KVM does not run Linux guests)"
)


def _fake_kvm(monkeypatch: pytest.MonkeyPatch, *, uid: int, gid: int, mode: int,
              groups: dict[str, tuple[int, list[str]]], my_groups: list[int]) -> None:
    """/dev/kvm that this process may not open, owned uid:gid with ``mode``; the host's groups."""
    real_open, real_stat = os.open, os.stat

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if path == "/dev/kvm":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if path == "/dev/kvm":
            return os.stat_result((stat.S_IFCHR | mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))
        return real_stat(path, *args, **kwargs)

    def struct(name: str, entry: tuple[int, list[str]]) -> grp.struct_group:
        return grp.struct_group((name, "x", entry[0], entry[1]))

    def getgrnam(name: str) -> grp.struct_group:
        if name not in groups:
            raise KeyError(name)
        return struct(name, groups[name])

    def getgrgid(gid_: int) -> grp.struct_group:
        for name, entry in groups.items():
            if entry[0] == gid_:
                return struct(name, entry)
        raise KeyError(gid_)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    monkeypatch.setattr(os, "getgroups", lambda: my_groups)
    monkeypatch.setattr(_kvm, "_user_name", lambda: "alice")


def test_no_kvm_group_gives_advice_that_works_there(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kvm(monkeypatch, uid=0, gid=0, mode=0o600, groups={"root": (0, [])}, my_groups=[1000])
    ok, reason = host.kvm_device_status()
    assert not ok
    assert "add alice to the kvm group" not in reason
    assert "root:root 0600 and this host has no kvm group" in reason
    assert "setfacl -m u:alice:rw /dev/kvm" in reason and "run as root" in reason
    assert host.KvmStatus(False, reason, probed=False).summary == "/dev/kvm is not accessible"


def test_kvm_group_that_the_device_does_not_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kvm group exists, but /dev/kvm is still root:root 0600: joining it would not help.
    _fake_kvm(monkeypatch, uid=0, gid=0, mode=0o600,
              groups={"root": (0, []), "kvm": (993, [])}, my_groups=[1000])
    reason = host.kvm_device_status()[1]
    assert "add alice to the kvm group" not in reason
    assert "root:root 0600 and its group cannot open it" in reason and "setfacl" in reason


def test_kvm_group_keeps_the_group_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kvm(monkeypatch, uid=0, gid=993, mode=0o660,
              groups={"root": (0, []), "kvm": (993, ["bob"])}, my_groups=[1000])
    ok, reason = host.kvm_device_status()
    assert not ok
    assert "add alice to the kvm group (usermod -aG kvm alice)" in reason
    assert "setfacl" not in reason


def test_kvm_group_member_whose_session_predates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kvm(monkeypatch, uid=0, gid=993, mode=0o660,
              groups={"root": (0, []), "kvm": (993, ["alice"])}, my_groups=[1000])
    reason = host.kvm_device_status()[1]
    assert "alice is in the kvm group but this session is not yet" in reason


def test_probe_verdict_has_a_short_summary() -> None:
    status = host.KvmStatus(False, HANG_REASON, probed=True)
    assert status.summary == "this host's KVM cannot run Linux guests"
    # A probe cached before summaries existed (no "summary" key) still gets one.
    cached: dict[str, Any] = {"usable": False, "reason": HANG_REASON, "probed": True,
                              "console": "", "cpu": None}
    assert host.KvmStatus(**cached).summary == status.summary
    aborted = host.KvmStatus(False, "-cpu host: QEMU exited with status -6 (x); "
                             "-cpu kvm64: QEMU exited with status 1 (y)", probed=True)
    assert "Assertion" not in aborted.summary and "every CPU model" in aborted.summary
    assert host.KvmStatus(True, "a probe boot ...", True, cpu="kvm64").summary.startswith("KVM")


def test_resolve_accel_summary_is_short_and_reason_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kvm, "kvm_status",
                        lambda *a, **k: host.KvmStatus(False, HANG_REASON, probed=True))
    qemu: Any = object()
    choice = host.resolve_accel("auto", qemu, ("vmlinuz", "initrd"))
    assert choice.accel == "tcg"
    assert choice.summary == "TCG: this host's KVM cannot run Linux guests (qemukit doctor)"
    assert "Assertion" in choice.reason and HANG_REASON in choice.reason
    assert host.resolve_accel("tcg", qemu, None).summary == "TCG (as requested)"
    # Built without a summary (e.g. from a detached VM's state file): the reason stands in.
    assert host.AccelChoice("kvm", "KVM: because").summary == "KVM: because"


def _no_cache() -> None:
    _virtiofsd._userns_prefix.cache_clear()


def test_normal_user_without_uidmap_is_told_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cache()
    real_which = shutil.which
    monkeypatch.setattr("qemukit.host._virtiofsd.shutil.which", lambda cmd, *a, **k: None
                        if cmd in ("newuidmap", "newgidmap") else real_which(cmd, *a, **k))
    monkeypatch.setattr(_virtiofsd, "uid_name", lambda uid: "alice")
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 1000)
    with pytest.raises(HostError, match=r"normal user \(alice\) needs newuidmap and "
                       r"newgidmap \(as root: apt-get install uidmap\); or run as root"):
        host.virtiofsd_launcher(("/usr/lib/qemu/virtiofsd", "c"))
    _no_cache()


def test_normal_user_without_subordinate_ids(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Any) -> None:
    _no_cache()
    monkeypatch.setattr("qemukit.host._virtiofsd.shutil.which", lambda cmd, *a, **k: f"/usr/bin/{cmd}")
    monkeypatch.setattr(_virtiofsd, "uid_name", lambda uid: "alice")
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 1000)
    subuid = tmp_path / "subuid"
    subuid.write_text("bob:100000:65536\n1000:165536:65536\n")  # alice by uid, in subuid only
    assert _virtiofsd._subid_range(str(subuid), "alice", 1000) == (165536, 65536)
    monkeypatch.setattr(_virtiofsd, "_SUBUID", str(subuid))
    monkeypatch.setattr(_virtiofsd, "_SUBGID", str(tmp_path / "subgid"))
    # The advice names a range no entry uses yet.
    with pytest.raises(HostError, match=rf"subordinate ids for alice in {tmp_path}/subgid "
                       r"\(as root: usermod --add-subuids 231072-296607 --add-subgids "
                       r"231072-296607 alice\)"):
        host.virtiofsd_launcher(("/usr/lib/qemu/virtiofsd", "c"))
    _no_cache()


def test_root_and_rust_virtiofsd_need_no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 0)
    assert host.virtiofsd_launcher(("/usr/lib/qemu/virtiofsd", "c")) == []
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 1000)
    assert host.virtiofsd_launcher(("/usr/libexec/virtiofsd", "rust")) == []


def test_c_virtiofsd_in_a_namespace_asks_only_for_the_users_fd_limit() -> None:
    share = Share.parse("/srv/a,b:/mnt/s")
    argv = host.virtiofsd_argv(("/usr/lib/qemu/virtiofsd", "c"), share, 5, ["unshare", "-U"])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1_000_000 if hard == resource.RLIM_INFINITY else min(hard, 1_000_000)
    guard = guard_prefix()
    assert argv == ["unshare", "-U", *guard, "/usr/lib/qemu/virtiofsd", "--fd=5",
                    f"--rlimit-nofile={expected}", "-o", "source=/srv/a\\,b", "-o", "cache=auto",
                    "-o", "modcaps=-mknod:-setfcap:-fsetid"]
    assert host.virtiofsd_argv(("/usr/lib/qemu/virtiofsd", "c"), share, 5)[:len(guard) + 1] == \
        [*guard, "/usr/lib/qemu/virtiofsd"]


def test_a_read_only_share_is_read_only_at_the_host_for_both_virtiofsds() -> None:
    share = Share.parse("/srv/a,b:/mnt/s,ro")
    c = host.virtiofsd_argv(("/usr/lib/qemu/virtiofsd", "c"), share, 5)
    # The C daemon has no read-only export: the guard serves it a read-only bind mount.
    assert c[:len(guard_prefix(["/srv/a,b"]))] == guard_prefix(["/srv/a,b"])
    assert "--ro" in guard_prefix(["/srv/a,b"])
    rust = host.virtiofsd_argv(("/usr/libexec/virtiofsd", "rust"), share, 5)
    assert rust[:len(guard_prefix())] == guard_prefix() and rust[-1] == "--readonly"


def test_qemu_runs_guarded_only_for_a_writable_9p_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import VMSpec

    writable_9p = (Share.parse("/srv:/mnt,9p"),)
    for shares in ((), (Share.parse("/srv:/mnt,9p,ro"),), (Share.parse("/srv:/mnt"),)):
        assert host.qemu_share_guard(VMSpec(shares=shares)) == []
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 0)
    assert host.qemu_share_guard(VMSpec(shares=writable_9p)) == guard_prefix(drop_caps=True)
    monkeypatch.setattr("qemukit.host._virtiofsd.os.geteuid", lambda: 1000)
    assert host.qemu_share_guard(VMSpec(shares=writable_9p)) == guard_prefix()


def test_a_host_the_share_guard_does_not_know_refuses_guarded_shares(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import VMSpec
    from qemukit.errors import HostError

    monkeypatch.setattr("qemukit.host._fsguard.platform.machine", lambda: "ppc64le")
    with pytest.raises(HostError, match="ppc64le.*read-only over 9p"):
        host.qemu_share_guard(VMSpec(shares=(Share.parse("/srv:/mnt,9p"),)))
    with pytest.raises(HostError, match="ppc64le"):
        host.virtiofsd_argv(("/usr/lib/qemu/virtiofsd", "c"), Share.parse("/srv:/mnt"), 5)
    assert host.qemu_share_guard(VMSpec(shares=(Share.parse("/srv:/mnt,9p,ro"),))) == []


# --------------------------------------------------------------- the probe's verdict in the cache

def _probe_counting(monkeypatch: pytest.MonkeyPatch, status: _kvm.KvmStatus,
                    delay: float = 0.0) -> list[float]:
    """Replace the probe boot (QEMU) with one that returns ``status``; returns the call log."""
    import time

    calls: list[float] = []

    def probe(*args: Any) -> _kvm.KvmStatus:
        calls.append(time.monotonic())
        time.sleep(delay)
        return status

    monkeypatch.setattr(_kvm, "kvm_device_status", lambda: (True, "ok"))
    monkeypatch.setattr(_kvm, "_probe_boot", probe)
    return calls


def _images(tmp_path: Any) -> tuple[str, str]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return str(kernel), str(initrd)


QEMU = host.QemuBinary(path="/usr/bin/qemu-system-x86_64", version=(7, 2, 0),
                       version_text="QEMU emulator version 7.2.0", machines=frozenset({"q35"}),
                       has_sandbox=True, qemu_img=None)


def test_a_timeout_on_a_busy_host_is_probed_again_later(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, cache: Any) -> None:
    import time

    busy = _kvm.KvmStatus(False, "did not reach its init (the host was busy)", True,
                          busy_timeout=True, probed_at=time.time())
    calls = _probe_counting(monkeypatch, busy)
    image = _images(tmp_path)
    assert not _kvm.kvm_status(QEMU, image).usable
    assert not _kvm.kvm_status(QEMU, image).usable
    assert len(calls) == 1, "within its time the cached verdict is used"
    stale = dataclasses.replace(busy, probed_at=time.time() - _kvm.BUSY_PROBE_TTL - 1)
    write_cache("kvm-probe.json", _kvm._probe_key(QEMU, *image), stale.__dict__)
    _kvm.kvm_status(QEMU, image)
    assert len(calls) == 2, "a busy host's timeout is not a verdict for the whole boot"


def test_a_timeout_on_an_idle_host_and_a_success_last_the_boot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, cache: Any) -> None:
    for status in (_kvm.KvmStatus(False, "did not reach its init", True, probed_at=1.0),
                   _kvm.KvmStatus(True, "reached the guest's init", True, cpu="host", probed_at=1.0)):
        for f in cache.iterdir():
            f.unlink()
        calls = _probe_counting(monkeypatch, status)
        image = _images(tmp_path)
        assert _kvm.kvm_status(QEMU, image).usable is status.usable
        assert _kvm.kvm_status(QEMU, image).usable is status.usable
        assert len(calls) == 1


def test_concurrent_first_starts_probe_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                            cache: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls = _probe_counting(monkeypatch, _kvm.KvmStatus(False, "hung", True, probed_at=1.0),
                            delay=0.3)
    image = _images(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda _: _kvm.kvm_status(QEMU, image), range(4)))
    assert len(calls) == 1, f"probed {len(calls)} times"
    assert all(not v.usable for v in verdicts)


def test_the_timeout_verdict_says_when_the_host_was_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kvm, "run_until_output", lambda *a, **k: (False, "Booting the kernel.", None))
    monkeypatch.setattr(_kvm, "_host_busy", lambda: (True, "load average 7.9 on 2 CPUs"))
    status = _kvm._probe_boot(QEMU, "/k", "/i", 8.0)
    assert status.busy_timeout and not status.usable
    assert "load average 7.9 on 2 CPUs" in status.reason and "probed again" in status.reason
    monkeypatch.setattr(_kvm, "_host_busy", lambda: (False, "load average 0.1 on 2 CPUs"))
    assert not _kvm._probe_boot(QEMU, "/k", "/i", 8.0).busy_timeout


def test_a_busy_hosts_timeout_is_not_summed_up_as_a_verdict(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-line summary (run's accelerator line, doctor) does not call it broken KVM."""
    monkeypatch.setattr(_kvm, "run_until_output", lambda *a, **k: (False, "Booting the kernel.", None))
    monkeypatch.setattr(_kvm, "_host_busy", lambda: (True, "load average 7.9 on 2 CPUs"))
    busy = _kvm._probe_boot(QEMU, "/k", "/i", 8.0)
    assert "cannot run" not in busy.summary and "not verified" in busy.summary
    monkeypatch.setattr(_kvm, "_host_busy", lambda: (False, "load average 0.1 on 2 CPUs"))
    assert _kvm._probe_boot(QEMU, "/k", "/i", 8.0).summary == "this host's KVM cannot run Linux guests"
