"""build_argv: golden command lines, QEMU's quoting rule, and the accelerator/CPU choice.

Golden files live in ``golden/`` as one JSON argv list each. After an
intended change to the command line, rewrite them with::

    QEMUKIT_UPDATE_GOLDEN=1 pytest tests/unit/test_argv.py

and read the diff: it is the change to what QEMU will be asked to run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemukit import Drive, Nic, PortForward, Share, SpecError, VMSpec
from qemukit._launch.argv import AGENT_PORT_NAME, Plumbing, build_argv, drive_ids, nic_ids, quote_opt
from qemukit.spec import NAME_RE, MachineType

from .optsplit import parse_opts, split_opts

GOLDEN = Path(__file__).parent / "golden"
QEMU = "/usr/bin/qemu-system-x86_64"


def check_golden(name: str, argv: list[str]) -> None:
    """Compare ``argv`` with ``golden/<name>.json``; rewrite it when QEMUKIT_UPDATE_GOLDEN=1."""
    path = GOLDEN / f"{name}.json"
    if os.environ.get("QEMUKIT_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(argv, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with QEMUKIT_UPDATE_GOLDEN=1")
    assert argv == json.loads(path.read_text(encoding="utf-8"))


def plumbing(
    run_dir: str,
    *,
    drive_files: tuple[str, ...] = (),
    drive_formats: tuple[str, ...] = (),
    drive_backing: tuple[tuple[tuple[str, str], ...], ...] = (),
    ovmf: bool = False,
) -> Plumbing:
    """The plumbing a launch would pass for a runtime directory ``run_dir``."""
    return Plumbing(
        qmp_fd=3,
        qmp_path=f"{run_dir}/qmp.sock",
        console_path=f"{run_dir}/console.sock",
        console_log=f"{run_dir}/console.log",
        agent_path=f"{run_dir}/agent.sock",
        drive_files=drive_files,
        drive_formats=drive_formats,
        drive_backing=drive_backing,
        ovmf_code="/usr/share/OVMF/OVMF_CODE_4M.fd" if ovmf else None,
        ovmf_vars=f"{run_dir}/ovmf-vars.fd" if ovmf else None,
    )


def option_values(argv: list[str], option: str) -> list[str]:
    """Every value given to ``option`` (e.g. all -device arguments)."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def option_value(argv: list[str], option: str) -> str:
    (value,) = option_values(argv, option)
    return value


# -- golden command lines ------------------------------------------------------------


def test_golden_minimal_q35() -> None:
    argv = build_argv(
        VMSpec(name="minimal"), qemu=QEMU, accel="tcg", plumbing=plumbing("/run/user/1000/qemukit/minimal")
    )
    check_golden("minimal_q35", argv)


def test_golden_console_read_by_the_launcher() -> None:
    # A VM whose launcher lives as long as it: QEMU inherits its end of the console's
    # connection to the launcher and logs nothing; the launcher writes the log.
    from dataclasses import replace

    argv = build_argv(
        VMSpec(name="owned"), qemu=QEMU, accel="tcg",
        plumbing=replace(plumbing("/run/user/1000/qemukit/owned"), console_fd=4, console_log=None),
    )
    check_golden("console_reader", argv)
    assert "socket,id=console0,fd=4" in option_values(argv, "-chardev")
    assert not any("logfile=" in arg for arg in argv)


def test_golden_kernel_boot() -> None:
    # Like images.spec("tiny"): direct kernel boot, panics end QEMU. Only a console
    # log (no socket), no agent socket: the file chardev and no virtio-serial.
    spec = VMSpec(
        name="tiny",
        kernel="/home/u/.cache/qemukit/tiny,v1/vmlinuz",
        initrd="/home/u/.cache/qemukit/tiny,v1/initrd.img",
        append="console=ttyS0 panic=-1 quiet memhp_default_state=online opt=a,b",
        no_reboot=True,
        hotplug_ports=1,
    )
    argv = build_argv(spec, qemu=QEMU, accel="kvm", plumbing=Plumbing(console_log="/run/qk/tiny/console.log"))
    check_golden("kernel_boot", argv)


def test_golden_drives() -> None:
    run = "/run/user/1000/qemukit/disks"
    spec = VMSpec(
        name="disks",
        hotplug_ports=0,
        drives=(
            Drive("/images/base,v2.qcow2", overlay=True),
            Drive("/images/seed.raw", format="raw", read_only=True),
            Drive("/images/data,1.qcow2", interface="virtio-scsi"),
            Drive("/images/data2.img", format="raw", interface="virtio-scsi", id="scratch"),
            Drive("/images/fast,,.qcow2", interface="nvme", read_only=True),
        ),
    )
    files = (
        f"{run}/overlay-disk0.qcow2",  # the overlay, not the base
        "/images/seed.raw",
        "/images/data,1.qcow2",
        "/images/data2.img",
        "/images/fast,,.qcow2",
    )
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=plumbing(run, drive_files=files, drive_formats=("qcow2", "raw", "qcow2", "raw", "qcow2"),
                          # The overlay's chain: the base (a qcow2 the user named over a raw).
                          drive_backing=((("/images/base,v2.qcow2", "qcow2"), ("/images/deb.raw", "raw")),
                                         (), (), (), ())),
    )
    check_golden("drives", argv)


def _blockdevs(argv: list[str]) -> list[dict[str, object]]:
    """Every -blockdev as a dict (JSON, or QEMU's key=value syntax)."""
    return [json.loads(b) if b.startswith("{") else dict(parse_opts(b))
            for b in option_values(argv, "-blockdev")]


def test_every_qcow2_node_says_what_its_backing_is() -> None:
    """QEMU never opens a backing file because a header names it: null, or a node we made."""
    spec = VMSpec(drives=(Drive("/b.qcow2", overlay=True), Drive("/d.qcow2"), Drive("/r.img")))
    argv = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(
        drive_files=("/run/ov.qcow2", "/d.qcow2", "/r.img"), drive_formats=("qcow2", "qcow2", "raw"),
        drive_backing=((("/b.qcow2", "qcow2"),), (), ())))
    nodes = _blockdevs(argv)
    by_name = {str(n["node-name"]): n for n in nodes}
    formats = [n for n in nodes if n["driver"] != "file"]
    assert all("backing" in n for n in formats if n["driver"] == "qcow2")
    assert all("backing" not in n for n in formats if n["driver"] == "raw")
    assert by_name["disk0-fmt"]["backing"] == "disk0-b0-fmt"
    assert by_name["disk0-b0-fmt"]["backing"] is None
    assert by_name["disk1-fmt"]["backing"] is None
    # The layer below is read-only, file and format node alike, and defined before its user.
    assert by_name["disk0-b0-fmt"]["read-only"] is True
    assert by_name["disk0-b0-file"]["read-only"] == "on"
    assert by_name["disk0-b0-file"]["filename"] == "/b.qcow2"
    names = [n["node-name"] for n in nodes]
    assert names.index("disk0-b0-fmt") < names.index("disk0-fmt")


def test_only_a_qcow2_layer_has_a_backing_layer() -> None:
    spec = VMSpec(drives=(Drive("/r.img"),))
    with pytest.raises(SpecError) as caught:
        build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(
            drive_files=("/r.img",), drive_formats=("raw",), drive_backing=((("/x", "raw"),),)))
    assert caught.value.field == "drive.backing"


def test_a_raw_drive_is_opened_raw_whatever_it_holds() -> None:
    """format=raw reaches QEMU as driver=raw: nothing QEMU could probe or follow."""
    spec = VMSpec(drives=(Drive("/scratch.img", format="raw"),))
    argv = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(
        drive_files=("/scratch.img",), drive_formats=("raw",)))
    assert [n["driver"] for n in _blockdevs(argv)] == ["file", "raw"]


def test_golden_nics() -> None:
    spec = VMSpec(
        name="nets",
        machine="pc",
        nics=(
            Nic(
                forwards=(
                    PortForward(2222, 22),
                    PortForward.parse("udp:0.0.0.0:5353:53"),
                    PortForward.parse("0.0.0.0:8080:80"),
                )
            ),
            Nic(kind="tap", ifname="tap0", mac="52:54:00:12:34:56", id="lan"),
        ),
    )
    argv = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=plumbing("/run/user/1000/qemukit/nets"))
    check_golden("nics", argv)


def test_golden_hotplug() -> None:
    spec = VMSpec(name="hotplug", cpus=2, max_cpus=8, memory=1024, max_memory=8192, slots=4, hotplug_ports=2)
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="kvm",
        cpu="host,-arch-capabilities",
        plumbing=plumbing("/run/user/1000/qemukit/hotplug"),
    )
    check_golden("hotplug", argv)


def test_golden_microvm() -> None:
    run = "/run/user/1000/qemukit/micro"
    spec = VMSpec(
        name="micro",
        machine="microvm",
        kernel="/boot/vmlinuz",
        append="console=ttyS0 reboot=t root=/dev/vda",
        drives=(Drive("/images/root.raw", format="raw"),),
        nics=(Nic(forwards=(PortForward(2222, 22),)),),
    )
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=plumbing(run, drive_files=("/images/root.raw",), drive_formats=("raw",)),
    )
    check_golden("microvm", argv)


def test_golden_ovmf() -> None:
    run = "/run/user/1000/qemukit/uefi"
    spec = VMSpec(name="uefi", firmware="ovmf", memory=1024, drives=(Drive("/images/esp.qcow2"),))
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=plumbing(run, drive_files=("/images/esp.qcow2",), drive_formats=("qcow2",), ovmf=True),
    )
    check_golden("ovmf", argv)


def test_golden_sandbox_and_extra_args() -> None:
    # A state directory with a comma in it: every socket and log path needs ',,'.
    spec = VMSpec(name="boxed", extra_args=("-device", "virtio-rng-pci,id=rng0", "-S"))
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        sandbox=True,
        name="boxed-1",
        plumbing=plumbing("/tmp/state,dir/boxed-1"),
    )
    check_golden("sandbox_extra_args", argv)


# -- properties of every command line -----------------------------------------------

_path_text = st.text(st.characters(exclude_characters="\x00\n"), min_size=1)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(path=_path_text, read_only=st.booleans())
def test_blockdev_filename_survives_qemu_parsing(path: str, read_only: bool) -> None:
    # Each value is either refused with a SpecError (only text QEMU cannot be given:
    # lone surrogates) or reaches QEMU's parser as exactly itself.
    try:
        spec = VMSpec(drives=(Drive(path, format="raw", read_only=read_only),), hotplug_ports=0)
    except SpecError as exc:
        assert exc.field == "drive.file" and not _utf8(path)
        return
    argv = build_argv(
        spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(drive_files=(path,), drive_formats=("raw",))
    )
    file_node = option_values(argv, "-blockdev")[0]
    expected = {"driver": "file", "node-name": "disk0-file", "filename": path}
    if read_only:
        expected["read-only"] = "on"
    assert parse_opts(file_node) == expected


@given(name=st.from_regex(NAME_RE, fullmatch=True))
def test_name_survives_qemu_parsing(name: str) -> None:
    argv = build_argv(VMSpec(name=name), qemu=QEMU, accel="tcg", plumbing=Plumbing())
    assert parse_opts(option_value(argv, "-name"), implied="guest") == {"guest": name}


@given(run_dir=_path_text)
def test_chardev_paths_survive_qemu_parsing(run_dir: str) -> None:
    argv = build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=plumbing(run_dir))
    chardevs = {}
    for text in option_values(argv, "-chardev"):
        opts = parse_opts(text, implied="backend")
        chardevs[opts["id"]] = opts
    assert chardevs["qmp-shared"]["path"] == f"{run_dir}/qmp.sock"
    assert chardevs["console0"]["path"] == f"{run_dir}/console.sock"
    assert chardevs["console0"]["logfile"] == f"{run_dir}/console.log"
    assert chardevs["agent0"]["path"] == f"{run_dir}/agent.sock"


@given(
    kernel=_path_text,
    initrd=_path_text,
    append=st.text(st.characters(exclude_characters="\x00")),
)
def test_kernel_initrd_append_are_verbatim(kernel: str, initrd: str, append: str) -> None:
    # QEMU stores these as they are: quoting them would change the guest's command line.
    try:
        spec = VMSpec(kernel=kernel, initrd=initrd, append=append)
    except SpecError as exc:
        assert not _utf8(exc.value)
        return
    argv = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing())
    start = argv.index("-kernel")  # the values may themselves look like options
    assert argv[start : start + 6] == ["-kernel", kernel, "-initrd", initrd, "-append", append]


def test_quote_opt() -> None:
    assert quote_opt("a,b,,c") == "a,,b,,,,c"
    assert split_opts(quote_opt("a,b,,c")) == ["a,b,,c"]
    with pytest.raises(SpecError):
        quote_opt("a\x00b")


def test_extra_args_come_last_and_verbatim() -> None:
    extra = ("-device", "virtio-rng-pci,id=rng0", "-S", "")
    argv = build_argv(VMSpec(extra_args=extra), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    assert tuple(argv[-len(extra) :]) == extra


def test_two_scsi_drives_share_one_controller() -> None:
    spec = VMSpec(drives=(Drive("a.img", interface="virtio-scsi"), Drive("b.img", interface="virtio-scsi")))
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=Plumbing(drive_files=("a.img", "b.img"), drive_formats=("raw", "raw")),
    )
    devices = option_values(argv, "-device")
    assert [d for d in devices if d.startswith("virtio-scsi-pci")] == ["virtio-scsi-pci,id=scsi0"]
    assert [d for d in devices if d.startswith("scsi-hd")] == [
        "scsi-hd,bus=scsi0.0,drive=disk0-fmt,id=disk0",
        "scsi-hd,bus=scsi0.0,drive=disk1-fmt,id=disk1",
    ]


def test_overlay_drive_uses_the_plumbing_file() -> None:
    spec = VMSpec(drives=(Drive("/base.qcow2", overlay=True),))
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=Plumbing(drive_files=("/run/ov.qcow2",), drive_formats=("qcow2",)),
    )
    assert "/base.qcow2" not in " ".join(argv)
    assert parse_opts(option_values(argv, "-blockdev")[0])["filename"] == "/run/ov.qcow2"


def test_agent_port_only_with_agent_socket() -> None:
    with_agent = build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    assert any(f"name={AGENT_PORT_NAME}" in d for d in option_values(with_agent, "-device"))
    without = build_argv(VMSpec(agent=False), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    assert not any("virtserialport" in d for d in option_values(without, "-device"))
    assert not any("agent" in c for c in option_values(without, "-chardev"))


def test_no_serial_means_no_console_chardev() -> None:
    argv = build_argv(VMSpec(serial=False), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    assert "-serial" not in argv
    assert not any("console0" in c for c in option_values(argv, "-chardev"))


def _device_ids(argv: list[str]) -> list[str]:
    ids = []
    for text in option_values(argv, "-device"):
        opts = parse_opts(text, implied="driver")
        if "id" in opts:
            ids.append(opts["id"])
    return ids


@pytest.mark.parametrize(
    "make_spec",
    [
        lambda: VMSpec(drives=(Drive("a.img", id="disk1"), Drive("b.img"))),
        lambda: VMSpec(drives=(Drive("a.img", id="net0"),), nics=(Nic(),)),
        lambda: VMSpec(nics=(Nic(id="net1"), Nic())),
        lambda: VMSpec(drives=(Drive("a.img", id="hp0"),)),
        lambda: VMSpec(drives=(Drive("a.img", id="scsi0"), Drive("b.img", interface="virtio-scsi"))),
        lambda: VMSpec(drives=(Drive("a.img", id="vser0"),)),
    ],
    ids=[
        "drive-vs-default-drive",
        "drive-vs-default-nic",
        "nic-vs-default-nic",
        "drive-vs-root-port",
        "drive-vs-scsi-controller",
        "drive-vs-virtio-serial",
    ],
)
def test_clashing_device_ids_are_refused_up_front(make_spec: Any) -> None:
    # A clash must be a SpecError naming the id, never QEMU's "Duplicate ID" at launch.
    with pytest.raises(SpecError) as info:
        make_spec()
    assert info.value.field == "id"


def test_accepted_specs_give_unique_device_ids() -> None:
    spec = VMSpec(
        drives=(Drive("a.img", id="data"), Drive("b.img"), Drive("c.img", interface="virtio-scsi")),
        nics=(Nic(id="uplink"), Nic()),
    )
    argv = build_argv(
        spec,
        qemu=QEMU,
        accel="tcg",
        plumbing=plumbing(
            "/r", drive_files=tuple(str(d.file) for d in spec.drives),
            drive_formats=("raw",) * len(spec.drives)
        ),
    )
    ids = _device_ids(argv)
    assert len(ids) == len(set(ids)), ids
    assert len(set(drive_ids(spec) + nic_ids(spec))) == len(spec.drives) + len(spec.nics)


def test_longest_accepted_drive_id_gives_valid_node_names() -> None:
    # QEMU refuses block node names of 32 characters or more ("Node name too long").
    with pytest.raises(SpecError):
        Drive("a.img", id="d" * 27)
    spec = VMSpec(drives=(Drive("a.img", id="d" * 26),))
    argv = build_argv(
        spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(drive_files=("a.img",), drive_formats=("raw",))
    )
    for text in option_values(argv, "-blockdev"):
        node_name = parse_opts(text)["node-name"]
        assert len(node_name) <= 31, node_name


def test_drive_files_must_match_drives() -> None:
    spec = VMSpec(drives=(Drive("a.img"), Drive("b.img")))
    with pytest.raises(SpecError) as info:
        build_argv(
            spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(drive_files=("a.img",), drive_formats=("raw",))
        )
    assert info.value.field == "drives"


def test_ovmf_needs_resolved_files() -> None:
    with pytest.raises(SpecError) as info:
        build_argv(VMSpec(firmware="ovmf"), qemu=QEMU, accel="tcg", plumbing=Plumbing())
    assert (info.value.field, info.value.value) == ("firmware", "ovmf")


# -- accelerator and CPU model -------------------------------------------------------------


@pytest.mark.parametrize("accel", ["auto", "hvf", "", "KVM"])
def test_accel_must_be_resolved(accel: str) -> None:
    with pytest.raises(SpecError) as info:
        build_argv(VMSpec(), qemu=QEMU, accel=accel, plumbing=Plumbing())
    assert (info.value.field, info.value.value) == ("accel", accel)


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_machine_names_the_accel(accel: str) -> None:
    argv = build_argv(VMSpec(machine="pc"), qemu=QEMU, accel=accel, plumbing=Plumbing())
    assert option_value(argv, "-machine") == f"pc,accel={accel}"


@pytest.mark.parametrize(
    ("accel", "spec_cpu", "host_cpu", "expected"),
    [
        ("kvm", None, None, "host"),
        ("kvm", None, "kvm64", "kvm64"),
        ("kvm", "max", "kvm64", "max"),
        ("kvm", "max", None, "max"),
        ("tcg", None, None, None),
        ("tcg", None, "max", "max"),
        ("tcg", "qemu64", None, "qemu64"),
    ],
)
def test_cpu_model(accel: str, spec_cpu: str | None, host_cpu: str | None, expected: str | None) -> None:
    argv = build_argv(VMSpec(cpu=spec_cpu), qemu=QEMU, accel=accel, plumbing=Plumbing(), cpu=host_cpu)
    assert option_values(argv, "-cpu") == ([expected] if expected else [])


def test_sandbox_only_when_asked() -> None:
    # The spec's wish is decided against the binary's support by the caller.
    assert "-sandbox" not in build_argv(VMSpec(sandbox=True), qemu=QEMU, accel="tcg", plumbing=Plumbing())
    argv = build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=Plumbing(), sandbox=True)
    assert re.fullmatch(r"on(,\w+=deny)+", option_value(argv, "-sandbox"))


def test_name_argument_overrides_spec_name() -> None:
    argv = build_argv(VMSpec(name="a"), qemu=QEMU, accel="tcg", plumbing=Plumbing(), name="b")
    assert option_value(argv, "-name") == "b"
    assert option_value(build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=Plumbing()), "-name") == "vm"


def test_build_argv_is_pure() -> None:
    spec = VMSpec(name="same", drives=(Drive("a.img"),), nics=(Nic(forwards=(PortForward(1, 2),)),))
    p = plumbing("/r", drive_files=("a.img",), drive_formats=("raw",))
    first = build_argv(spec, qemu=QEMU, accel="kvm", plumbing=p)
    assert build_argv(spec, qemu=QEMU, accel="kvm", plumbing=p) == first
    assert first[0] == QEMU
    assert all(isinstance(a, str) for a in first)


def test_run_as_uses_the_binary_s_option_and_allows_the_uid_switch() -> None:
    spec = VMSpec(run_as="nobody")
    old = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(), sandbox=True)
    new = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(), sandbox=True,
                     run_with=True)
    assert option_value(old, "-runas") == "nobody" and "-run-with" not in old
    assert option_value(new, "-run-with") == "user=nobody" and "-runas" not in new
    assert "elevateprivileges=allow" in option_value(old, "-sandbox")
    plain = build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=Plumbing(), sandbox=True)
    assert "elevateprivileges=deny" in option_value(plain, "-sandbox")


def test_qmp_tcp_only_when_asked_and_on_loopback() -> None:
    plain = build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    assert not any("host=" in c or "port=" in c for c in option_values(plain, "-chardev"))
    argv = build_argv(VMSpec(qmp_tcp_port=4444), qemu=QEMU, accel="tcg", plumbing=plumbing("/r"))
    tcp = [parse_opts(c, implied="backend") for c in option_values(argv, "-chardev")
           if "port=" in c]
    assert tcp == [{"backend": "socket", "id": "qmp-tcp", "host": "127.0.0.1", "port": "4444",
                    "server": "on", "wait": "off"}]
    assert "chardev=qmp-tcp,mode=control" in option_values(argv, "-mon")


def test_microvm_kernel_gets_the_host_tsc_rate_once() -> None:
    spec = VMSpec(machine="microvm", kernel="/k", append="console=ttyS0")
    argv = build_argv(spec, qemu=QEMU, accel="tcg", plumbing=Plumbing(), tsc_khz=2596120)
    assert option_value(argv, "-append") == "console=ttyS0 tsc_early_khz=2596120"
    given = spec.replace(append="tsc_early_khz=1000")
    argv = build_argv(given, qemu=QEMU, accel="tcg", plumbing=Plumbing(), tsc_khz=2596120)
    assert option_value(argv, "-append") == "tsc_early_khz=1000"
    q35 = build_argv(spec.replace(machine="q35"), qemu=QEMU, accel="tcg", plumbing=Plumbing(),
                     tsc_khz=2596120)
    assert option_value(q35, "-append") == "console=ttyS0"


@pytest.mark.parametrize(("machine", "device"), [("q35", "vhost-user-fs-pci"),
                                                 ("microvm", "vhost-user-fs-device")])
def test_virtiofs_shares_guest_ram_and_uses_the_machine_s_transport(machine: MachineType,
                                                                   device: str) -> None:
    spec = VMSpec(machine=machine, kernel="/k", shares=(Share("/src,x", "/mnt/src"),))
    argv = build_argv(spec, qemu=QEMU, accel="tcg",
                      plumbing=Plumbing(share_sockets=("/r/vfs.sock",)))
    assert "memory-backend=ram0" in option_value(argv, "-machine")
    assert "memory-backend-memfd,id=ram0,size=512M,share=on" in option_values(argv, "-object")
    assert any(d.startswith(f"{device},chardev=share0-vfs,tag=share0")
               for d in option_values(argv, "-device"))
    legacy_off = "virtio-mmio.force-legacy=false" in option_values(argv, "-global")
    assert legacy_off == (machine == "microvm")  # vhost-user needs virtio 1.0 on MMIO
    assert option_value(argv, "-append").endswith("qemukit.share=share0:/mnt/src")


def test_gdb_stub_is_a_unix_socket_unless_tcp_is_asked_for() -> None:
    unix = build_argv(VMSpec(gdb=True, gdb_wait=True), qemu=QEMU, accel="tcg",
                      plumbing=Plumbing(gdb_path="/r,x/gdb.sock"))
    chardevs = [parse_opts(c, implied="backend") for c in option_values(unix, "-chardev")]
    assert chardevs == [{"backend": "socket", "id": "gdb0", "path": "/r,x/gdb.sock",
                         "server": "on", "wait": "off"}]
    assert option_values(unix, "-gdb") == ["chardev:gdb0"] and "-S" in unix
    tcp = build_argv(VMSpec(gdb_port=1234), qemu=QEMU, accel="tcg", plumbing=Plumbing())
    chardevs = [parse_opts(c, implied="backend") for c in option_values(tcp, "-chardev")]
    assert chardevs == [{"backend": "socket", "id": "gdb0", "host": "127.0.0.1", "port": "1234",
                         "server": "on", "wait": "off"}]
    assert "-S" not in tcp
    with pytest.raises(SpecError, match="gdb"):
        build_argv(VMSpec(gdb=True), qemu=QEMU, accel="tcg", plumbing=Plumbing())
    assert "-gdb" not in build_argv(VMSpec(), qemu=QEMU, accel="tcg", plumbing=Plumbing())


def test_plan_puts_the_gdb_socket_in_the_runtime_directory(tmp_path: Path) -> None:
    from qemukit._launch.plan import HostFacts, plan_launch
    from qemukit._launch.runtime import RuntimeDir

    rd = RuntimeDir(tmp_path / "vm")
    facts = HostFacts(qemu=QEMU, accel="tcg")
    argv = plan_launch(VMSpec(gdb=True), facts, rd, ()).argv()
    assert f"path={rd.path}/gdb.sock" in option_values(argv, "-chardev")[0]
    assert plan_launch(VMSpec(gdb_port=0), facts, rd, ()).plumbing.gdb_path is None


def test_golden_tb_size() -> None:
    # Many TCG VMs per host: a bounded code buffer through -accel (QEMU refuses it beside
    # -machine accel=, so the machine loses its accel= option).
    argv = build_argv(
        VMSpec(name="pooled", tb_size="128M"), qemu=QEMU, accel="tcg",  # type: ignore[arg-type]
        plumbing=plumbing("/run/user/1000/qemukit/pooled"),
    )
    check_golden("tb_size", argv)
    assert option_value(argv, "-machine") == "q35"
    assert option_value(argv, "-accel") == "tcg,tb-size=128"


def test_tb_size_is_ignored_under_kvm() -> None:
    argv = build_argv(VMSpec(name="k", tb_size=64), qemu=QEMU, accel="kvm",
                      plumbing=plumbing("/run/qk/k"))
    assert "-accel" not in argv
    assert option_value(argv, "-machine").startswith("q35,accel=kvm")


@pytest.mark.parametrize("bad", [0, 4096, "1K", True, "lots"])
def test_tb_size_out_of_range_names_the_field(bad: object) -> None:
    with pytest.raises(SpecError, match="tb_size"):
        VMSpec(tb_size=bad)  # type: ignore[arg-type]


def test_pool_tb_size_per_vm_count() -> None:
    from qemukit.host._tcg import tb_size_for

    assert tb_size_for(1, 8192) is None  # one VM: QEMU's default
    assert tb_size_for(2, 8192) == 256
    assert tb_size_for(8, 8192) == 256
    assert tb_size_for(16, 8192) == 128
    assert tb_size_for(64, 8192) == 64  # never below the floor
    assert tb_size_for(4, 1024) == 64
