"""qemukit.kconfig without QEMU or a compiler: the fragment per arch, fake trees, config checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qemukit import Share, SpecError, VMSpec, kconfig
from qemukit.arch import ARCHES
from qemukit.cli import EXIT_ERROR, main
from qemukit.kernel import bzimage_release, run_in_vm

# -- the fragment -------------------------------------------------------------------------------


def opts(arch: str) -> dict[str, str]:
    return kconfig.fragment_options(arch)


@pytest.mark.parametrize("arch", list(ARCHES))
def test_every_arch_gets_what_the_tiny_guest_and_agent_need(arch: str) -> None:
    got = opts(arch)
    for name in ("VIRTIO_CONSOLE", "VIRTIO_BLK", "VIRTIO_NET", "DEVTMPFS", "DEVTMPFS_MOUNT",
                 "TMPFS", "PROC_FS", "SYSFS", "VIRTIO_FS", "FUSE_FS", "NET_9P_VIRTIO", "9P_FS",
                 "BLK_DEV_INITRD", "RD_GZIP", "BINFMT_ELF", "BINFMT_SCRIPT", "PRINTK",
                 "MAGIC_SYSRQ", "UNIX98_PTYS"):
        assert got[f"CONFIG_{name}"] == "y", (arch, name)
    # qemukit's continue_on_oops needs an oops that does not panic: never forced on.
    assert "CONFIG_PANIC_ON_OOPS" not in got
    text = kconfig.fragment(arch)
    assert text.startswith(f"# qemukit kconfig fragment v{kconfig.KCONFIG_VERSION} for {arch}")
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == [
        f"{k}={v}" for k, v in got.items()]


def test_x86_64_pci_acpi_hotplug_microvm_and_64bit() -> None:
    got = opts("x86_64")
    for name in ("64BIT", "SERIAL_8250_CONSOLE", "PCI", "VIRTIO_PCI", "VIRTIO_MMIO",
                 "VIRTIO_MMIO_CMDLINE_DEVICES", "ACPI", "ACPI_BUTTON", "HOTPLUG_PCI_PCIE",
                 "HOTPLUG_PCI_ACPI", "ACPI_HOTPLUG_CPU", "MEMORY_HOTPLUG", "ACPI_HOTPLUG_MEMORY"):
        assert got[f"CONFIG_{name}"] == "y", name


def test_s390x_is_ccw_with_the_sclp_console_and_no_pci() -> None:
    got = opts("s390x")
    assert got["CONFIG_S390_GUEST"] == "y" and got["CONFIG_SCLP_VT220_CONSOLE"] == "y"
    assert not {"CONFIG_PCI", "CONFIG_VIRTIO_PCI", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_ACPI",
                "CONFIG_SERIAL_8250"} & got.keys()
    assert got["CONFIG_HOTPLUG_CPU"] == "y"


def test_aarch64_pl011_generic_pci_host_and_pcie_hotplug_without_acpi() -> None:
    got = opts("aarch64")
    for name in ("SERIAL_AMBA_PL011_CONSOLE", "PCI_HOST_GENERIC", "VIRTIO_PCI", "HOTPLUG_PCI_PCIE",
                 "KEYBOARD_GPIO", "GPIO_PL061"):
        assert got[f"CONFIG_{name}"] == "y", name
    assert not {"CONFIG_ACPI", "CONFIG_HOTPLUG_PCI_ACPI", "CONFIG_64BIT"} & got.keys()


def test_riscv64_has_no_pci_hotplug_and_ppc64le_is_pseries_hvc() -> None:
    riscv = opts("riscv64")
    assert riscv["CONFIG_SERIAL_OF_PLATFORM"] == "y" and riscv["CONFIG_VIRTIO_PCI"] == "y"
    assert not {"CONFIG_HOTPLUG_PCI", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_HOTPLUG_CPU"} & riscv.keys()
    ppc = opts("ppc64le")
    assert ppc["CONFIG_HVC_CONSOLE"] == "y" and ppc["CONFIG_PPC_PSERIES"] == "y"
    assert ppc["CONFIG_CPU_LITTLE_ENDIAN"] == "y" and ppc["CONFIG_MEMORY_HOTPLUG"] == "y"
    assert "CONFIG_HOTPLUG_PCI_PCIE" not in ppc


def test_unknown_arch_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="arch='mips'"):
        kconfig.fragment("mips")


def test_cli_print_writes_the_fragment() -> None:
    result = CliRunner().invoke(main, ["kconfig", "--print", "--arch", "s390x"])
    assert result.exit_code == 0, result.output
    assert result.output == kconfig.fragment("s390x")


# -- fake trees ----------------------------------------------------------------------------------


def fake_tree(root: Path, image: str | None = "arch/x86/boot/bzImage",
              config: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Makefile").write_text("all:\n")
    (root / "Kconfig").write_text("")
    (root / "arch" / "x86").mkdir(parents=True)
    if image is not None:
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).write_bytes(b"kernel")
    if config is not None:
        (root / ".config").write_text(config)
    return root


def full_config(arch: str = "x86_64", without: tuple[str, ...] = ()) -> str:
    return "".join(f"{k}={v}\n" if k not in without else f"# {k} is not set\n"
                   for k, v in opts(arch).items())


def test_find_tree_infers_the_arch_from_the_built_image(tmp_path: Path) -> None:
    tree = kconfig.find_tree(fake_tree(tmp_path / "x86"))
    assert (tree.arch, tree.image, tree.config, tree.modules) == (
        "x86_64", tmp_path / "x86" / "arch/x86/boot/bzImage", None, False)
    arm = kconfig.find_tree(fake_tree(tmp_path / "arm", "arch/arm64/boot/Image"))
    assert arm.arch == "aarch64" and arm.image.name == "Image"
    s390 = kconfig.find_tree(fake_tree(tmp_path / "s390", "arch/s390/boot/bzImage"))
    assert s390.arch == "s390x"
    ppc = kconfig.find_tree(fake_tree(tmp_path / "ppc", "vmlinux", "CONFIG_PPC64=y\n"))
    assert ppc.arch == "ppc64le" and ppc.image == tmp_path / "ppc" / "vmlinux"


def test_find_tree_errors_name_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"no built image \(looked for arch/x86/boot/bzImage, "
                                        r"arch/arm64/boot/Image"):
        kconfig.find_tree(fake_tree(tmp_path / "unbuilt", None))
    with pytest.raises(SpecError, match="looked for arch/arm64/boot/Image\\)"):
        kconfig.find_tree(tmp_path / "unbuilt", "aarch64")
    with pytest.raises(SpecError, match="arch='aarch64'.*built for x86_64"):
        kconfig.find_tree(fake_tree(tmp_path / "x86"), "aarch64")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SpecError, match="not a file and not a kernel tree"):
        kconfig.find_tree(tmp_path / "plain")


def test_an_out_of_tree_build_dir_and_its_modules(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "src", None)
    build = tmp_path / "build"
    build.mkdir()
    (build / "Makefile").write_text("include source/Makefile\n")
    os.symlink(src, build / "source")
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "arch/x86/boot/bzImage").write_bytes(b"k")
    (build / ".config").write_text("CONFIG_MODULES=y\n")
    assert kconfig.is_tree(build)
    assert not kconfig.find_tree(build).modules  # no modules built yet
    (build / "modules.order").write_text("drivers/virtio/virtio_balloon.o\n")
    tree = kconfig.find_tree(build)
    assert tree.modules and tree.config == build / ".config"
    (build / ".config").write_text("# CONFIG_MODULES is not set\n")
    assert not kconfig.find_tree(build).modules


def test_kernel_config_is_found_beside_the_image(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "t", config="CONFIG_X=y\n")
    assert kconfig.kernel_config(tree) == tree / ".config"
    assert kconfig.kernel_config(tree / "arch/x86/boot/bzImage") == tree / ".config"
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"k")
    assert kconfig.kernel_config(boot / "vmlinuz-6.1.0-9-amd64") is None
    (boot / "config-6.1.0-9-amd64").write_text("CONFIG_X=y\n")
    assert kconfig.kernel_config(boot / "vmlinuz-6.1.0-9-amd64") == boot / "config-6.1.0-9-amd64"


def test_read_config_skips_unset_lines(tmp_path: Path) -> None:
    path = tmp_path / ".config"
    path.write_text('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=m\n')
    assert kconfig.read_config(path) == {"CONFIG_A": "y", "CONFIG_C": '"x y"', "CONFIG_D": "m"}


# -- missing options, before the boot -------------------------------------------------------------


def test_missing_options_follow_the_spec() -> None:
    config = {k: v for k, v in opts("x86_64").items()}
    spec = VMSpec(kernel="/k", initrd="/i", shares=(Share("/tmp", tag="a"),
                                                    Share("/tmp", "/mnt/b", "b", transport="9p")))
    assert kconfig.missing_options(spec, config) == []
    del config["CONFIG_VIRTIO_CONSOLE"], config["CONFIG_9P_FS"]
    config["CONFIG_VIRTIO_FS"] = "m"  # a module counts: the initramfs may carry it
    missing = dict(kconfig.missing_options(spec, config))
    assert list(missing) == ["CONFIG_VIRTIO_CONSOLE", "CONFIG_9P_FS"]
    assert "agent" in missing["CONFIG_VIRTIO_CONSOLE"] and "share b (9p)" in missing["CONFIG_9P_FS"]
    assert kconfig.missing_options(spec.replace(agent="none", shares=()), config) == []
    micro = VMSpec(machine="microvm", kernel="/k", agent="none")
    assert [o for o, _ in kconfig.missing_options(micro, {"CONFIG_DEVTMPFS": "y",
                                                          "CONFIG_SERIAL_8250_CONSOLE": "y"})] == [
        "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"]
    s390 = VMSpec(arch="s390x", kernel="/k", agent="none")
    assert [o for o, _ in kconfig.missing_options(s390, {"CONFIG_DEVTMPFS": "y"})] == [
        "CONFIG_S390_GUEST", "CONFIG_SCLP_CONSOLE", "CONFIG_SCLP_VT220_CONSOLE"]


def test_a_tree_without_virtio_console_fails_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = fake_tree(tmp_path / "t", config=full_config(without=("CONFIG_VIRTIO_CONSOLE",)))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"")
    monkeypatch.setenv("QEMUKIT_STATE", str(tmp_path / "state"))

    def no_vm(*_: object, **__: object) -> None:
        raise AssertionError("a VM was created")

    monkeypatch.setattr("qemukit.kernel.VM", no_vm)
    with pytest.raises(SpecError) as info:
        run_in_vm(VMSpec(kernel=str(tree), initrd=str(initrd)), ["true"])
    assert info.value.field == "kernel" and info.value.value == str(tree)
    assert "lacks CONFIG_VIRTIO_CONSOLE (" in info.value.reason
    assert "CONFIG_VIRTIO_CONSOLE" in str(info.value) and str(tree / ".config") in str(info.value)
    # The image inside the tree is checked the same way (the tree's .config is its config).
    with pytest.raises(SpecError, match="lacks CONFIG_VIRTIO_CONSOLE"):
        run_in_vm(VMSpec(kernel=str(tree / "arch/x86/boot/bzImage"), initrd=str(initrd)), "true")
    result = CliRunner().invoke(main, ["run", "--accel", "tcg", "--kernel", str(tree),
                                       "--initrd", str(initrd), "--", "true"],
                                env={"QEMUKIT_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == EXIT_ERROR, result.output
    assert "lacks CONFIG_VIRTIO_CONSOLE" in result.output
    assert "qemukit agent talks over a virtio-console port" in result.output


def test_a_tree_on_the_command_line_gives_its_arch(tmp_path: Path) -> None:
    from qemukit.cli import build_spec

    from .test_cli import _opts

    tree = fake_tree(tmp_path / "arm", "arch/arm64/boot/Image")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    spec = build_spec(_opts(kernel=str(tree), initrd=str(initrd)))
    assert spec.arch == "aarch64" and spec.kernel == str(tree)
    result = CliRunner().invoke(main, ["run", "--arch", "s390x", "--kernel", str(tree),
                                       "--initrd", str(initrd), "--", "true"])
    assert result.exit_code == EXIT_ERROR and "built for aarch64" in result.output


# -- merging, with a fake merge_config.sh and Makefile ---------------------------------------------


def test_merge_reports_what_olddefconfig_dropped(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "t", None, "CONFIG_OLD=y\n")
    script = tree / "scripts" / "kconfig" / "merge_config.sh"
    script.parent.mkdir(parents=True)
    # merge_config.sh -m -O DIR BASE FRAGMENT: append the fragment to the base.
    script.write_text('shift 3; cat "$1" "$2" > "$1.new" && mv "$1.new" "$1"\n')
    # olddefconfig: VIRTIO_FS's dependencies are "unmet" in this tree.
    (tree / "Makefile").write_text("olddefconfig:\n\tsed -i '/CONFIG_VIRTIO_FS=/d' .config\n")
    result = kconfig.merge_into_tree(tree, "x86_64")
    assert dict(result.dropped) == {"CONFIG_VIRTIO_FS": "n"}
    config = kconfig.read_config(tree / ".config")
    assert config["CONFIG_OLD"] == "y" and config["CONFIG_VIRTIO_CONSOLE"] == "y"
    out = CliRunner().invoke(main, ["kconfig", "--arch", "x86_64", str(tree)])
    assert out.exit_code == EXIT_ERROR
    assert "CONFIG_VIRTIO_FS: wanted y, olddefconfig left n" in out.output
    (tree / "Makefile").write_text("olddefconfig:\n\ttrue\n")
    out = CliRunner().invoke(main, ["kconfig", str(tree)])
    assert out.exit_code == 0 and "none dropped" in out.output


def test_merge_refuses_a_directory_that_is_no_tree(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a kernel source tree"):
        kconfig.merge_into_tree(tmp_path)


def test_bzimage_release_reads_the_setup_header(tmp_path: Path) -> None:
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x300).to_bytes(2, "little")
    version = b"6.1.158-qk (root@host) #1 SMP\0"
    image[0x500:0x500 + len(version)] = version
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(image))
    assert bzimage_release(path) == "6.1.158-qk"
    path.write_bytes(b"\x7fELF" + bytes(0x300))
    assert bzimage_release(path) is None


class _AgentlessVM:
    """A VM whose init reports ready but whose agent never answers (no virtio-console)."""

    def __init__(self, spec: VMSpec, **_: object) -> None:
        from qemukit import VMState

        self.spec, self.accel, self.console_log = spec, None, None
        self.warm_start = None  # a cold start
        self.state = VMState.STOPPED

    def start(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> float:
        from qemukit import WaitTimeout

        raise WaitTimeout("the guest agent", timeout, self.console_tail(5))

    def console_tail(self, lines: int) -> str:
        return "Run /init as init process\nqemukit-init: ready\n"

    def console_events(self) -> list[object]:
        return []


def test_an_agent_that_never_answers_after_init_names_virtio_console(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "bzImage"  # no config anywhere near it: nothing to check before boot
    kernel.write_bytes(b"k")
    monkeypatch.setattr("qemukit.kernel.VM", _AgentlessVM)
    result = run_in_vm(VMSpec(kernel=str(kernel)), ["true"], timeout=5)
    assert result.outcome == "timeout"
    assert "timed out after 5s waiting for the guest agent" in (result.error or "")
    assert "CONFIG_VIRTIO_CONSOLE" in (result.error or "")
    # Without the agent in the spec the hint would be wrong: it is not given.
    result = run_in_vm(VMSpec(kernel=str(kernel), agent="none"), ["true"], timeout=5)
    assert "CONFIG_VIRTIO_CONSOLE" not in (result.error or "")


# -- resolving a spec's kernel: one step for every start ---------------------------------------------

RELEASE = "6.1.0-qk"
#: A tree's modules_install, faked: one module, the build link modules_install leaves, and a
#: line in installs.log per run.
INSTALLING_MAKEFILE = f"""\
modules_install:
\tmkdir -p $(INSTALL_MOD_PATH)/lib/modules/{RELEASE}/kernel
\tprintf 'kernel/b.ko:\\n' > $(INSTALL_MOD_PATH)/lib/modules/{RELEASE}/modules.dep
\tprintf 'ELF' > $(INSTALL_MOD_PATH)/lib/modules/{RELEASE}/kernel/b.ko
\tln -s $(CURDIR) $(INSTALL_MOD_PATH)/lib/modules/{RELEASE}/build
\techo installed >> installs.log
"""


def tree_with_modules(root: Path) -> Path:
    tree = fake_tree(root, config=full_config() + "CONFIG_MODULES=y\nCONFIG_VIRTIO_BALLOON=m\n")
    (tree / "Makefile").write_text(INSTALLING_MAKEFILE)
    (tree / "modules.order").write_text("drivers/virtio/virtio_balloon.o\n")
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text(RELEASE + "\n")
    return tree


def base_initrd(path: Path) -> Path:
    import gzip

    path.write_bytes(gzip.compress(b"070701" + b"0" * 100))
    return path


@pytest.fixture(autouse=True)
def _some_depmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake trees' make needs no depmod; the host may have none (kmod not installed)."""
    monkeypatch.setattr("qemukit.kconfig._depmod", lambda: "/bin/true")


def test_a_tree_with_modules_and_no_depmod_is_refused_before_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import HostError

    tree = tree_with_modules(tmp_path / "t")
    monkeypatch.setattr("qemukit.kconfig._depmod", lambda: None)
    with pytest.raises(HostError, match="apt-get install kmod"):
        kconfig.resolve_kernel(VMSpec(kernel=str(tree), initrd=str(tmp_path / "i")))
    # A make that leaves no modules.dep (its depmod missing) is an error, not a guest
    # whose modprobe finds nothing.
    (tree / "Makefile").write_text(INSTALLING_MAKEFILE.replace("modules.dep", "modules.other"))
    with pytest.raises(HostError, match="wrote no modules.dep"):
        kconfig.install_modules(kconfig.find_tree(tree), tmp_path / "dest")


def test_a_tree_resolves_to_its_image_and_its_modules_go_into_a_copy_of_the_initrd(
        tmp_path: Path) -> None:
    import gzip

    tree = tree_with_modules(tmp_path / "t")
    initrd = base_initrd(tmp_path / "initrd.img")
    resolved = kconfig.resolve_kernel(VMSpec(kernel=str(tree), initrd=str(initrd)))
    assert resolved.spec.kernel == str(tree / "arch/x86/boot/bzImage")
    assert resolved.tree is not None and resolved.tree.root == tree
    assert resolved.install_tree_modules and resolved.needs_files and resolved.modules is None
    assert resolved.release == RELEASE and resolved.config == tree / ".config"
    assert not (tree / "installs.log").exists()  # resolving writes and runs nothing
    work = tmp_path / "rt" / "kernel"
    booted = resolved.materialize(work)
    assert booted.kernel == resolved.spec.kernel and booted.initrd is not None
    assert Path(booted.initrd).parent == work and Path(booted.initrd).read_bytes().startswith(
        initrd.read_bytes())
    unpacked = gzip.decompress(Path(booted.initrd).read_bytes())
    assert f"lib/modules/{RELEASE}/kernel/b.ko".encode() in unpacked
    assert f"lib/modules/{RELEASE}/build".encode() not in unpacked  # a link into the tree
    assert sorted(p.name for p in work.iterdir()) == ["initrd-with-modules.img"]
    assert (tree / "installs.log").read_text() == "installed\n"


def test_given_modules_win_over_the_trees_and_mistakes_come_before_anything(
        tmp_path: Path) -> None:
    tree = tree_with_modules(tmp_path / "t")
    initrd = base_initrd(tmp_path / "initrd.img")
    mods = tmp_path / "mods" / "lib" / "modules" / RELEASE
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    resolved = kconfig.resolve_kernel(VMSpec(kernel=str(tree), initrd=str(initrd)),
                                      tmp_path / "mods")
    assert resolved.modules == tmp_path / "mods" and not resolved.install_tree_modules
    with pytest.raises(SpecError, match="the tree's modules need an initrd"):
        kconfig.resolve_kernel(VMSpec(kernel=str(tree)))
    with pytest.raises(SpecError, match="no such file or kernel tree"):
        kconfig.resolve_kernel(VMSpec(kernel=str(tmp_path / "gone")))
    image = tree / "arch/x86/boot/bzImage"
    with pytest.raises(SpecError, match="needs a kernel booted with an initrd"):
        kconfig.resolve_kernel(VMSpec(kernel=str(image)), tmp_path / "mods")
    os.mkfifo(mods / "fifo")
    with pytest.raises(SpecError, match="is a named pipe"):
        kconfig.resolve_kernel(VMSpec(kernel=str(image), initrd=str(initrd)), tmp_path / "mods")
    # A tree without modules built (or with CONFIG_MODULES off) writes nothing.
    (tree / "modules.order").unlink()
    plain = kconfig.resolve_kernel(VMSpec(kernel=str(tree), initrd=str(initrd)))
    assert not plain.needs_files and plain.materialize(tmp_path / "unused") == plain.spec
    assert not (tmp_path / "unused").exists()


def test_a_vm_of_a_tree_checks_its_config_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import VM

    monkeypatch.setenv("QEMUKIT_STATE", str(tmp_path / "state"))
    tree = fake_tree(tmp_path / "t", config=full_config(without=("CONFIG_VIRTIO_CONSOLE",)))
    initrd = base_initrd(tmp_path / "initrd.img")
    vm = VM(VMSpec(kernel=str(tree), initrd=str(initrd), accel="tcg"))
    with pytest.raises(SpecError, match="lacks CONFIG_VIRTIO_CONSOLE"):
        vm.start()
    assert vm.pid is None
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").iterdir())


def test_cmdline_shows_the_image_a_tree_boots(tmp_path: Path) -> None:
    from qemukit.vm import preview_argv

    tree = tree_with_modules(tmp_path / "t")
    initrd = base_initrd(tmp_path / "initrd.img")
    argv, notes = preview_argv(VMSpec(kernel=str(tree), initrd=str(initrd), accel="tcg"))
    assert argv[argv.index("-kernel") + 1] == str(tree / "arch/x86/boot/bzImage")
    assert any("with the tree's modules" in note for note in notes)
    assert not (tree / "installs.log").exists()


# -- the machine of a kernel run -----------------------------------------------------------------


def test_a_kernel_run_gets_microvm_unless_something_needs_q35(tmp_path: Path) -> None:
    from qemukit.kernel import kernel_run_machine

    tree = fake_tree(tmp_path / "t", config=full_config())
    spec = VMSpec(kernel=str(tree), initrd="/i")

    def pick(s: VMSpec = spec, **kw: object) -> tuple[str, str]:
        args: dict[str, object] = {"one_shot": True, "warm_asked": False, "tsc_khz": 2_000_000}
        args.update(kw)
        choice = kernel_run_machine(s, **args)  # type: ignore[arg-type]
        return choice.machine, choice.describe()

    machine, line = pick()
    assert machine == "microvm" and line.startswith("machine microvm: nothing in this run")
    # The image inside the tree finds the same config.
    assert pick(spec.replace(kernel=str(tree / "arch/x86/boot/bzImage")))[0] == "microvm"
    for changed, why in (
            ({"one_shot": False}, "--detach, the console"),
            ({"warm_asked": True}, "vmgenid"),
            ({"tsc_khz": None}, "TSC rate is unknown"),
            ({"ran_before": True}, "ran here before")):
        machine, line = pick(**changed)
        assert machine == "q35" and line.startswith("machine q35: ") and why in line, changed
    for fields, why in (({"max_cpus": 4}, "CPU or memory hotplug"),
                        ({"max_memory": "2G"}, "CPU or memory hotplug"),
                        ({"firmware": "ovmf"}, "firmware ovmf"),
                        ({"drives": ("/d.qcow2,if=nvme",)}, "other than virtio-blk"),
                        ({"extra_args": ("-device", "e1000")}, "--qemu-arg")):
        machine, line = pick(spec.replace(**fields))
        assert machine == "q35" and why in line, fields
    # The kernel must be known to drive microvm's virtio-mmio devices.
    (tree / ".config").write_text(full_config(without=("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",)))
    machine, line = pick()
    assert machine == "q35" and f"{tree / '.config'} lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" in line
    bare = tmp_path / "bzImage"
    bare.write_bytes(b"k")
    machine, line = pick(VMSpec(kernel=str(bare), initrd="/i"))
    assert machine == "q35" and "config is not known" in line
    arm = VMSpec(arch="aarch64", kernel=str(bare))
    assert pick(arm)[0] == "virt"


def test_run_kernel_says_its_machine_under_v_and_machine_overrides(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = fake_tree(tmp_path / "t", config=full_config())
    initrd = base_initrd(tmp_path / "initrd.img")
    seen: list[VMSpec] = []

    def fake_run_in_vm(spec: VMSpec, *_: object, **__: object) -> object:
        seen.append(spec)
        raise SystemExit(0)

    monkeypatch.setattr("qemukit.kernel.run_in_vm", fake_run_in_vm)
    monkeypatch.setattr("qemukit.host.tsc_khz", lambda: 2_000_000)
    base = ["run", "--accel", "tcg", "--kernel", str(tree), "--initrd", str(initrd)]
    out = CliRunner().invoke(main, [*base, "-v", "--", "true"])
    assert out.exit_code == 0, out.output
    assert "qemukit: machine microvm: nothing in this run needs q35" in out.output
    chosen = seen[-1]
    assert chosen.machine == "microvm" and not chosen.warm
    out = CliRunner().invoke(main, [*base, "--machine", "q35", "-v", "--", "true"])
    asked = seen[-1]
    assert asked.machine == "q35" and "machine microvm" not in out.output
    out = CliRunner().invoke(main, [*base, "--warm", "-v", "--", "true"])
    warm = seen[-1]
    assert warm.machine == "q35" and warm.warm and "vmgenid" in out.output


@pytest.mark.parametrize("arch", list(ARCHES))
def test_dumps_readable_by_drgn_where_qemu_has_a_vmcoreinfo_device(arch: str) -> None:
    got = opts(arch)
    if ARCHES[arch].no_vmcoreinfo is not None:
        assert "CONFIG_FW_CFG_SYSFS" not in got  # no fw_cfg there: nothing to ask for
        return
    # drgn: "compile the kernel with CONFIG_FW_CFG_SYSFS and CONFIG_KEXEC" (CRASH_CORE is
    # what qemu_fw_cfg needs to write the note; KEXEC or KEXEC_FILE selects it).
    assert got["CONFIG_FW_CFG_SYSFS"] == "y" and got["CONFIG_CRASH_CORE"] == "y"
    assert got.get("CONFIG_KEXEC") == "y" or got.get("CONFIG_KEXEC_FILE") == "y"
