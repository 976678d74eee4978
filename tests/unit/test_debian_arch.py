"""The debian image on other architectures (aarch64): keys, recipe, refusals, argv (no QEMU).

Golden file: ``golden/debian_aarch64.json`` (rewrite with QEMUKIT_UPDATE_GOLDEN=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import HostError, SpecError, VMSpec, images
from qemukit._launch.argv import Plumbing, build_argv, seed_device_args
from qemukit.arch import ARCHES
from qemukit.cli import main
from qemukit.host import _binfmt, foreign_exec_problem
from qemukit.images import debian
from qemukit.spec import CloudInit

from .test_argv import check_golden

RECIPE = Path(__file__).parents[2] / "images" / "debian"
RUN = "/run/user/1000/qemukit/deb"
#: The x86_64 key of a fixed input, as it was before aarch64 existed: an x86_64 image
#: built then must still be found (no rebuild because another architecture was added).
X86_KEY_OF_FIXED_INPUT = "a28264be3ad1d07d0558f54825a60aea7da995fc671644043e781f3c641bb7af"



@pytest.fixture
def default_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMUKIT_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("QEMUKIT_DEBIAN_SECURITY_MIRROR", raising=False)


# -- cache keys and the recipe ---------------------------------------------------------


@pytest.mark.usefixtures("default_mirrors")
def test_x86_64_key_is_unchanged_and_aarch64_has_its_own() -> None:
    fixed = {"packages": b"x"}
    assert debian.cache_key("bookworm", recipe_files=fixed) == X86_KEY_OF_FIXED_INPUT
    assert debian.cache_key("bookworm", recipe_files=fixed, arch="x86_64") == X86_KEY_OF_FIXED_INPUT
    assert debian.cache_key("bookworm", recipe_files=fixed, arch="aarch64") != X86_KEY_OF_FIXED_INPUT


def test_image_directories_name_the_foreign_arch_only(tmp_path: Path) -> None:
    x86 = debian._image_dir(tmp_path, recipe_dir=RECIPE)
    arm = debian._image_dir(tmp_path, recipe_dir=RECIPE, arch="aarch64")
    assert x86.name.startswith("bookworm-") and not x86.name.startswith("bookworm-aarch64-")
    assert arm.name.startswith("bookworm-aarch64-") and arm.parent == x86.parent
    assert debian.find_debian(tmp_path, arch="aarch64") is None


def test_arm64_recipe_files_are_in_the_arm64_key_only(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe"
    (recipe / "arm64").mkdir(parents=True)
    for name in ("packages", "cloud.cfg"):
        (recipe / name).write_bytes((RECIPE / name).read_bytes())
    for name in ("packages", "initramfs-modules"):
        (recipe / "arm64" / name).write_bytes((RECIPE / "arm64" / name).read_bytes())
    x86, arm = (debian._image_dir(tmp_path, recipe_dir=recipe, arch=a) for a in ("x86_64", "aarch64"))
    (recipe / "arm64" / "initramfs-modules").write_text("virtio_pci\n")
    assert debian._image_dir(tmp_path, recipe_dir=recipe) == x86
    assert debian._image_dir(tmp_path, recipe_dir=recipe, arch="aarch64") != arm


def test_arm64_package_list_swaps_the_kernel() -> None:
    x86 = debian.read_package_list(RECIPE)
    arm = debian.read_package_list(RECIPE, "aarch64")
    assert "linux-image-cloud-amd64" in x86 and "linux-image-arm64" not in x86
    assert "linux-image-arm64" in arm and not any(p.endswith("-amd64") for p in arm)
    assert [p for p in x86 if not p.startswith("linux-image-")] == [
        p for p in arm if not p.startswith("linux-image-")]


def test_initramfs_preload_sets_modules_list(tmp_path: Path) -> None:
    tree = debian._initramfs_preload(tmp_path, RECIPE, "aarch64")
    conf = (tree / "etc/initramfs-tools/conf.d/qemukit").read_text()
    assert "MODULES=list" in conf
    modules = (tree / "usr/share/initramfs-tools/modules.d/qemukit.conf").read_text().split()
    assert {"virtio_pci", "virtio_blk", "ext4"} <= set(modules)
    assert all(not m.startswith("#") for m in modules)


def test_mmdebstrap_argv_is_foreign_only_for_aarch64(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class FakePopen:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            seen.append(argv)
            self.stdout = iter(["I: done\n"])
            self.returncode = 0

        def __enter__(self) -> FakePopen:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr("qemukit.images.debian.subprocess.Popen", FakePopen)
    monkeypatch.setattr(debian, "host_arch", lambda: "x86_64")
    debian._mmdebstrap(tmp_path / "a", ["p"], lambda s: None)
    debian._mmdebstrap(tmp_path / "b", ["p"], lambda s: None, "bookworm", "aarch64",
                       tmp_path / "preload")
    x86, arm = seen
    assert not any(a.startswith(("--architectures", "--setup-hook")) for a in x86)
    assert "--architectures=arm64" in arm
    assert f"--setup-hook=sync-in {tmp_path / 'preload'} /" in arm
    with pytest.raises(RuntimeError, match="white space"):
        debian._mmdebstrap(tmp_path / "c", ["p"], lambda s: None, "bookworm", "aarch64",
                           tmp_path / "with space")


# -- refusals before any work -------------------------------------------------------------


def test_unsupported_arch_and_bootable_aarch64_are_refused(cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("build_debian ran")

    monkeypatch.setattr(images, "build_debian", must_not_build)
    with pytest.raises(SpecError) as riscv:
        images.build("debian", arch="riscv64")
    assert (riscv.value.field, riscv.value.value) == ("arch", "riscv64")
    with pytest.raises(SpecError) as boot:
        images.build("debian", arch="aarch64", bootable=True)
    assert boot.value.field == "bootable" and "x86_64 only" in str(boot.value)
    with pytest.raises(SpecError):
        images.spec("debian", arch="s390x")


def test_missing_binfmt_is_one_line_before_any_work(cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("qemukit.images.debian.os.geteuid", lambda: 0)
    monkeypatch.setattr(debian, "host_arch", lambda: "x86_64")
    def foreign_exec_problem(arch: str) -> str:
        calls.append(arch)
        return "binfmt_misc is not mounted (fake)"

    monkeypatch.setattr(debian, "foreign_exec_problem", foreign_exec_problem)

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("mmdebstrap ran")

    monkeypatch.setattr(debian, "_mmdebstrap", must_not_run)
    monkeypatch.setattr("qemukit.images.debian.subprocess.run", must_not_run)
    with pytest.raises(HostError) as caught:
        images.build("debian", arch="aarch64")
    message = str(caught.value)
    assert calls == ["aarch64"]
    assert "\n" not in message
    assert "aarch64" in message and "binfmt_misc is not mounted (fake)" in message
    assert not (cache / "debian").exists()  # no work directory was made


def test_missing_arch_test_is_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.images.debian.os.geteuid", lambda: 0)
    monkeypatch.setattr(debian, "host_arch", lambda: "x86_64")
    monkeypatch.setattr(debian, "foreign_exec_problem", lambda arch: None)
    monkeypatch.setattr("qemukit.images.debian.shutil.which", lambda name: None)
    with pytest.raises(HostError, match="apt-get install arch-test"):
        images.build("debian", arch="aarch64")
    assert not (cache / "debian").exists()


# -- the binfmt_misc probe ------------------------------------------------------------------

ENTRY = ("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\n"
         "offset 0\nmagic 7f454c46\nmask ffffffff\n")


def _fake_binfmt(tmp_path: Path, status: str | None = "enabled", entry: str | None = None) -> Path:
    root = tmp_path / "binfmt_misc"
    root.mkdir()
    if status is not None:
        (root / "status").write_text(status + "\n")
    if entry is not None:
        (root / "qemu-aarch64").write_text(entry)
    return root


@pytest.mark.parametrize(("status", "entry", "expected"), [
    (None, None, "not mounted at"),
    ("disabled", None, "binfmt_misc is disabled"),
    ("enabled", None, "apt-get install qemu-user-static binfmt-support"),
    ("enabled", ENTRY.format(flags="PF").replace("enabled", "disabled", 1),
     "update-binfmts --enable qemu-aarch64"),
    ("enabled", ENTRY.format(flags="P"), "lacks the F (fix-binary) flag"),
])
def test_binfmt_probe_says_what_is_missing(tmp_path: Path, status: str | None, entry: str | None,
                                           expected: str) -> None:
    problem = foreign_exec_problem("aarch64", _fake_binfmt(tmp_path, status, entry), "x86_64")
    assert problem is not None and expected in problem and "\n" not in problem


def test_binfmt_probe_passes_a_registered_entry_and_the_native_arch(tmp_path: Path) -> None:
    root = _fake_binfmt(tmp_path, "enabled", ENTRY.format(flags="PF"))
    assert foreign_exec_problem("aarch64", root, "x86_64") is None
    assert foreign_exec_problem("aarch64", tmp_path / "nothing", "aarch64") is None
    assert foreign_exec_problem("x86_64", tmp_path / "nothing", "x86_64") is None
    assert set(_binfmt.BINFMT_ENTRIES) == set(ARCHES)


def test_binfmt_probe_on_this_host_matches_the_kernel() -> None:
    # What the probe says must agree with the kernel's own table, whatever this host has.
    problem = foreign_exec_problem("aarch64")
    entry = _binfmt.BINFMT_DIR / "qemu-aarch64"
    if problem is None:
        text = entry.read_text()
        assert text.startswith("enabled") and "F" in text.split("flags:")[1].split("\n")[0]
    else:
        assert not entry.is_file() or not entry.read_text().startswith("enabled") or "F" not in \
            entry.read_text().split("flags:")[1].split("\n")[0]


# -- the spec and its argv ------------------------------------------------------------------


def _fake_image(monkeypatch: pytest.MonkeyPatch) -> debian.DebianImage:
    fake = debian.DebianImage(Path("/img/disk.qcow2"), Path("/img/vmlinuz"), Path("/img/initrd.img"),
                              "6.1.0-57-arm64", Path("/img"), {"arch": "arm64"})
    asked: list[str] = []

    def find(cache: Path, **kwargs: Any) -> debian.DebianImage:
        asked.append(kwargs.get("arch", "x86_64"))
        return fake

    monkeypatch.setattr(images, "find_debian", find)
    return fake


def test_debian_aarch64_spec_boots_virt_with_seed_agent_and_ssh(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    fake = _fake_image(monkeypatch)
    spec = images.spec("debian", arch="aarch64", accel="tcg")
    assert (spec.arch, spec.machine, spec.agent, spec.cpus, spec.memory) == (
        "aarch64", "virt", "qga", 2, 1024)
    assert spec.cloud_init == CloudInit()
    assert spec.kernel == str(fake.kernel) and spec.initrd == str(fake.initrd)
    assert spec.append == "root=/dev/vda rw console=ttyAMA0 net.ifnames=0"
    assert images.debian_append() == images.DEBIAN_APPEND
    assert spec.nics[0].forwards[0].guest_port == 22


def test_debian_aarch64_not_built_says_how_to_build(cache: Path) -> None:
    with pytest.raises(HostError, match="qemukit images build debian --arch aarch64"):
        images.spec("debian", arch="aarch64")


def test_seed_cd_is_refused_where_it_was_not_checked() -> None:
    VMSpec(arch="aarch64", kernel="/k", cloud_init=CloudInit())
    with pytest.raises(SpecError) as info:
        VMSpec(arch="riscv64", kernel="/k", cloud_init=CloudInit())
    assert info.value.field == "cloud_init" and "x86_64 and aarch64" in str(info.value)


def test_golden_debian_aarch64(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_image(monkeypatch)
    spec = images.spec("debian", arch="aarch64", accel="tcg").replace(name="deb")
    plumbing = Plumbing(qmp_fd=3, qmp_path=f"{RUN}/qmp.sock", console_path=f"{RUN}/console.sock",
                        console_log=f"{RUN}/console.log", agent_path=f"{RUN}/agent.sock",
                        drive_files=(f"{RUN}/overlay-disk0.qcow2",), drive_formats=("qcow2",))
    argv = build_argv(spec, qemu="/usr/bin/qemu-system-aarch64", accel="tcg", plumbing=plumbing,
                      sandbox=True) + seed_device_args(spec, f"{RUN}/seed.iso")
    assert "virtio-scsi-pci,id=scsi1" in argv and "scsi-cd,bus=scsi1.0,drive=cidata-fmt,id=cidata0" in argv
    check_golden("debian_aarch64", argv)


def test_cli_refuses_bootable_aarch64_before_building(cache: Path) -> None:
    result = CliRunner().invoke(main, ["images", "build", "debian", "--arch", "aarch64",
                                       "--bootable"])
    assert result.exit_code == 125, result.output
    assert result.stderr.count("\n") == 1 and "bootable" in result.stderr
    assert not (cache / "debian").exists()
