"""``--rootfs host``: the spec change (shares, kernel arguments) and its errors, no QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qemukit import VMSpec
from qemukit._launch.initline import init_arguments, kernel_cmdline
from qemukit.cli import main
from qemukit.errors import SpecError
from qemukit.host import virtiofsd_argv
from qemukit.host._fsguard import guard_prefix
from qemukit.rootfs import GUEST_MOUNT, host_root, in_directory, resolve_host_root, root_transport
from qemukit.spec import HostRoot


@pytest.fixture
def tiny_files(tmp_path: Path) -> VMSpec:
    """A spec like the tiny image's: a kernel and an initramfs with a manifest beside them."""
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    (tmp_path / "manifest.json").write_text(json.dumps({"modules": ["virtiofs.ko", "overlay.ko"]}))
    return VMSpec(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                  append="console=ttyS0")


def test_the_host_root_is_a_read_only_share_and_a_kernel_argument(tiny_files: VMSpec,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = host_root(tiny_files, rw=[out], transport="9p")
    assert spec.shares == () and spec.append == "console=ttyS0"  # a part, not shares and tokens
    root, rw = spec.all_shares
    assert (root.host_path, root.guest_path, root.read_only, root.transport) == (
        "/", GUEST_MOUNT, True, "9p")
    assert (rw.host_path, rw.guest_path, rw.read_only) == (str(out), str(out), False)
    # The one writer of the init's command line puts the shares and the root there.
    assert init_arguments(spec) == [f"qemukit.share=hostroot:{GUEST_MOUNT}",
                                    f"qemukit.share=rw0:{out}", f"qemukit.rootfs={GUEST_MOUNT}"]
    assert kernel_cmdline(spec) == "console=ttyS0 " + " ".join(init_arguments(spec))


def test_the_root_goes_over_virtiofs_where_the_image_has_no_9p(tiny_files: VMSpec) -> None:
    assert root_transport(tiny_files) == "virtiofs"
    (root,) = host_root(tiny_files).all_shares
    # Read-only at the host over virtiofs too (virtiofsd is served a read-only bind mount).
    assert (root.transport, root.read_only) == ("virtiofs", True)
    manifest = Path(str(tiny_files.initrd)).parent / "manifest.json"
    manifest.write_text(json.dumps({"modules": ["9p.ko", "virtiofs.ko"]}))
    assert root_transport(tiny_files) == "9p"
    manifest.unlink()  # a kernel and initramfs of one's own: 9p (qemukit kconfig enables it)
    assert root_transport(tiny_files) == "9p"


def test_virtiofsd_serves_the_host_root_from_a_chroot_sandbox(tiny_files: VMSpec) -> None:
    (root,) = host_root(tiny_files).all_shares
    argv = virtiofsd_argv(("/usr/lib/qemu/virtiofsd", "c"), root, 3)
    assert argv[-2:] == ["-o", "sandbox=chroot"]  # pivot_root into "/" fails with EBUSY
    assert argv[:len(guard_prefix(["/"]))] == guard_prefix(["/"])  # served read-only


@pytest.mark.parametrize(("spec_changes", "rw", "field", "why"), [
    ({}, ("/no/such/dir",), "rw", "no such directory"),
    ({}, ("/",), "rw", "cannot be writable"),
])
def test_bad_host_root_requests_are_refused(tiny_files: VMSpec, spec_changes: dict[str, object],
                                            rw: tuple[str, ...], field: str, why: str) -> None:
    with pytest.raises(SpecError) as err:
        host_root(tiny_files.replace(**spec_changes), rw=rw)
    assert err.value.field == field and why in str(err.value)


def test_a_spec_booting_from_its_disk_has_its_own_root() -> None:
    with pytest.raises(SpecError) as err:
        host_root(VMSpec())
    assert err.value.field == "rootfs" and "needs a kernel" in str(err.value)


def test_rw_without_rootfs_host_is_a_usage_error_before_anything_starts(tiny_files: VMSpec,
                                                                        tmp_path: Path) -> None:
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(tiny_files.dumps())
    result = CliRunner().invoke(main, ["cmdline", "-f", str(spec_file), "--rw", str(tmp_path)])
    assert result.exit_code == 125
    assert "--rw needs --rootfs host" in result.output


def test_in_directory_starts_the_command_in_cwd_without_a_shell_string() -> None:
    argv = in_directory(["printf", "%s\n", "a b", "$HOME"], "/some dir")
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["sh", "/some dir", "printf", "%s\n", "a b",
                                                      "$HOME"]


def test_a_normal_user_is_refused_the_root_over_the_c_virtiofsd_and_told_why(
        tiny_files: VMSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import qemukit.host

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(qemukit.host, "find_virtiofsd", lambda: ("/usr/lib/qemu/virtiofsd", "c"))
    with pytest.raises(SpecError) as info:
        host_root(tiny_files)
    assert info.value.field == "rootfs" and "O_NOATIME" in info.value.reason
    assert "CONFIG_9P_FS" in info.value.reason and "Rust virtiofsd" in info.value.reason
    # Over 9p (a kernel with it) the same user is fine, and so is the Rust virtiofsd.
    assert host_root(tiny_files, transport="9p").all_shares[0].transport == "9p"
    monkeypatch.setattr(qemukit.host, "find_virtiofsd", lambda: ("/usr/libexec/virtiofsd", "rust"))
    assert host_root(tiny_files).all_shares[0].transport == "virtiofs"


def test_another_kernel_with_the_tiny_initramfs_is_judged_by_its_own_config(
        tiny_files: VMSpec, tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "bzImage").write_bytes(b"k")
    spec = tiny_files.replace(kernel=str(own / "bzImage"))  # the tiny manifest is not its
    assert root_transport(spec) == "9p"  # no config: qemukit kconfig's kernels have 9p
    (own / ".config").write_text("CONFIG_VIRTIO_FS=y\nCONFIG_FUSE_FS=y\n")
    assert root_transport(spec) == "virtiofs"
    (own / ".config").write_text("CONFIG_VIRTIO_FS=y\nCONFIG_9P_FS=y\nCONFIG_NET_9P_VIRTIO=y\n")
    assert root_transport(spec) == "9p"


def test_host_root_is_a_spec_part_written_in_toml_and_resolved_at_start(
        tiny_files: VMSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(tiny_files.dumps() + '\n[host_root]\nrw = ["out"]\n')
    spec = VMSpec.load(spec_file)
    assert spec.host_root == HostRoot(rw=("out",))
    assert VMSpec.load(_write(tmp_path / "again.toml", spec.dumps())) == spec  # round trip
    resolved = resolve_host_root(spec)  # as every start does (kconfig.resolve_kernel)
    assert resolved.host_root == HostRoot(rw=(str(tmp_path / "out"),), transport="virtiofs")
    assert resolve_host_root(resolved) is resolved
    with pytest.raises(SpecError) as err:
        spec.all_shares  # noqa: B018 - unresolved: a relative directory is refused, not guessed
    assert err.value.field == "host_root.rw"


@pytest.mark.parametrize(("table", "field", "why"), [
    ({"rw": ["/"]}, "host_root.rw", "cannot be writable"),
    ({"rw": "out"}, "host_root.rw", "must be a list"),
    ({"transport": "nfs"}, "host_root.transport", "must be one of"),
    ({"root": "/"}, "host_root.root", "unknown field"),
])
def test_bad_host_root_tables_name_the_field(tiny_files: VMSpec, table: dict[str, object],
                                             field: str, why: str) -> None:
    with pytest.raises(SpecError) as err:
        VMSpec.from_dict({**tiny_files.to_dict(), "host_root": table})
    assert err.value.field == field and why in str(err.value)


def test_host_root_needs_a_kernel() -> None:
    with pytest.raises(SpecError) as err:
        VMSpec(host_root=HostRoot())
    assert err.value.field == "host_root" and "needs a kernel" in err.value.reason


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
