"""VMSpec and its parts: validation, the CLI string forms, and TOML round trips.

A call marked ``# type: ignore[arg-type]`` passes on purpose what the field types do not
allow: a form VMSpec takes at run time (sizes as "1G", TOML lists, CLI strings) or a
value it must refuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemukit import Drive, Nic, PortForward, Share, SpecError, VMSpec, parse_drive, parse_nic, parse_size
from qemukit.spec import DEFAULT_MEMORY_SLOTS, CloudInit, HostRoot


def spec_error(make: Callable[[], object]) -> SpecError:
    """Call ``make`` and return the SpecError it raised (failing if it raised none)."""
    with pytest.raises(SpecError) as info:
        make()
    return info.value


def same_value(actual: Any, expected: Any) -> bool:
    """Equal and of the same type, so True is not taken for 1 nor '2' for 2."""
    return type(actual) is type(expected) and actual == expected


# -- validation: each bad value names its field and the value -------------------

BAD_NAMES = ["", "../x", "/", "a" * 41, "x y", "-x", ".hidden", "a/b", "a,b", "a=b", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name(name: str) -> None:
    err = spec_error(lambda: VMSpec(name=name))
    assert err.field == "name"
    assert same_value(err.value, name)


@pytest.mark.parametrize("name", ["a", "vm-1", "A.b_c-d", "9lives", "a" * 40])
def test_good_name(name: str) -> None:
    assert VMSpec(name=name).name == name


@pytest.mark.parametrize("cpus", [0, -1, True, "2", 2.0, 289])
def test_bad_cpus(cpus: object) -> None:
    err = spec_error(lambda: VMSpec(cpus=cpus))  # type: ignore[arg-type]
    assert err.field == "cpus"
    assert same_value(err.value, cpus)


def test_max_cpus_below_cpus() -> None:
    err = spec_error(lambda: VMSpec(cpus=4, max_cpus=2))
    assert (err.field, err.value) == ("max_cpus", 2)
    assert VMSpec(cpus=4, max_cpus=4).max_cpus == 4


@pytest.mark.parametrize("memory", ["12Q", 8, -5, 0, "1K", "1.5G", "", True, 512.0])
def test_bad_memory(memory: object) -> None:
    err = spec_error(lambda: VMSpec(memory=memory))  # type: ignore[arg-type]
    assert err.field == "memory"
    assert same_value(err.value, memory)


def test_max_memory_below_memory() -> None:
    err = spec_error(lambda: VMSpec(memory="2G", max_memory="1G", slots=1))  # type: ignore[arg-type]
    assert err.field == "max_memory"
    assert err.value == 1024  # the parsed size, in MiB


def test_max_memory_gets_default_slots(tmp_path: Path) -> None:
    spec = VMSpec(memory="1G", max_memory="4G")  # type: ignore[arg-type]
    assert (spec.max_memory, spec.slots) == (4096, DEFAULT_MEMORY_SLOTS)
    assert DEFAULT_MEMORY_SLOTS == 8
    spec.dump(tmp_path / "vm.toml")
    assert VMSpec.load(tmp_path / "vm.toml") == spec


def test_explicit_slots_win_over_the_default() -> None:
    assert VMSpec(max_memory="4G", slots=2).slots == 2  # type: ignore[arg-type]
    assert VMSpec(max_memory="4G", slots=256).slots == 256  # type: ignore[arg-type]


@pytest.mark.parametrize("slots", [-1, 257, "4", 1.5, True])
def test_bad_slots_with_max_memory(slots: object) -> None:
    err = spec_error(lambda: VMSpec(max_memory="4G", slots=slots))  # type: ignore[arg-type]
    assert err.field == "slots" and same_value(err.value, slots)


def test_no_slots_without_max_memory() -> None:
    assert VMSpec().slots == 0
    assert VMSpec(memory="4G").slots == 0  # type: ignore[arg-type]


def test_default_slots_follow_max_memory_through_replace() -> None:
    plain = VMSpec(memory="1G")  # type: ignore[arg-type]
    grown = plain.replace(max_memory="4G")
    assert grown.slots == DEFAULT_MEMORY_SLOTS
    assert grown.replace(max_memory=None).slots == 0
    assert VMSpec(max_memory="4G", slots=2).replace(max_memory="8G").slots == 2  # type: ignore[arg-type]
    err = spec_error(lambda: grown.replace(max_memory=None, slots=2))
    assert (err.field, err.value) == ("slots", 2)


def test_slots_need_max_memory() -> None:
    err = spec_error(lambda: VMSpec(slots=2))
    assert (err.field, err.value) == ("slots", 2)


def test_memory_hotplug_accepted() -> None:
    spec = VMSpec(memory="1G", max_memory="4GiB", slots=2)  # type: ignore[arg-type]
    assert (spec.memory, spec.max_memory, spec.slots) == (1024, 4096, 2)


@pytest.mark.parametrize(
    "kwargs", [{"initrd": "/boot/initrd.img"}, {"append": "console=ttyS0"}], ids=["initrd", "append"]
)
def test_initrd_or_append_without_kernel(kwargs: dict[str, Any]) -> None:
    err = spec_error(lambda: VMSpec(**kwargs))
    assert (err.field, err.value) == ("kernel", None)
    assert VMSpec(kernel="/boot/vmlinuz", **kwargs).kernel == "/boot/vmlinuz"


def test_microvm_without_kernel() -> None:
    err = spec_error(lambda: VMSpec(machine="microvm"))
    assert (err.field, err.value) == ("kernel", None)


def test_microvm_rejects_nvme_drive() -> None:
    drives = (Drive("root.img"), Drive("data.img", interface="nvme"))
    err = spec_error(lambda: VMSpec(machine="microvm", kernel="/k", drives=drives))
    assert err.field == "drives"
    assert err.value == drives


def test_microvm_rejects_ovmf() -> None:
    err = spec_error(lambda: VMSpec(machine="microvm", kernel="/k", firmware="ovmf"))
    assert (err.field, err.value) == ("firmware", "ovmf")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machine", "virt"),
        ("accel", "hvf"),
        ("firmware", "uboot"),
        ("cpu", "host cpu"),
        ("cpu", ""),
        ("hotplug_ports", 33),
        ("hotplug_ports", -1),
        ("serial", "yes"),
        ("agent", 1),
        ("no_reboot", None),
        ("sandbox", "off"),
        ("kernel", ""),
        ("kernel", "a\nb"),
        ("append", "a\x00b"),
    ],
)
def test_bad_simple_fields(field: str, value: object) -> None:
    extra: dict[str, Any] = {"kernel": "/k"} if field == "append" else {}
    err = spec_error(lambda: VMSpec(**{field: value}, **extra))  # type: ignore[arg-type]
    assert err.field == field
    assert same_value(err.value, value)


def test_extra_args_as_str() -> None:
    err = spec_error(lambda: VMSpec(extra_args="-S"))  # type: ignore[arg-type]
    assert (err.field, err.value) == ("extra_args", "-S")


@pytest.mark.parametrize("extra_args", [5, None], ids=["int", "None"])
def test_extra_args_not_a_list(extra_args: object) -> None:
    # What `extra_args = 5` in a TOML file gives; a SpecError, not a TypeError.
    err = spec_error(lambda: VMSpec(extra_args=extra_args))  # type: ignore[arg-type]
    assert err.field == "extra_args"
    assert same_value(err.value, extra_args)


def test_extra_args_items_must_be_str() -> None:
    err = spec_error(lambda: VMSpec(extra_args=("-S", 3)))  # type: ignore[arg-type]
    assert (err.field, err.value) == ("extra_args", 3)


# -- drives ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"interface": "ide"}, "drive.interface", "ide"),
        ({"format": "vmdk"}, "drive.format", "vmdk"),
        ({"read_only": True, "overlay": True}, "drive.overlay", True),
        ({"read_only": "yes"}, "drive.read_only", "yes"),
        ({"overlay": 1}, "drive.overlay", 1),
        ({"id": "1disk"}, "drive.id", "1disk"),
        ({"id": "a,b"}, "drive.id", "a,b"),
        ({"id": ""}, "drive.id", ""),
        ({"backing": "raw:/b.img"}, "drive.backing", "raw:/b.img"),
        ({"backing": ("/b.img",)}, "drive.backing", "/b.img"),
        ({"backing": ("vmdk:/b.img",)}, "drive.backing", "vmdk:/b.img"),
        ({"backing": ("raw:",)}, "drive.backing", ""),
        ({"format": "raw", "backing": ("raw:/b.img",)}, "drive.backing", ("raw:/b.img",)),
    ],
)
def test_bad_drive(kwargs: dict[str, Any], field: str, value: object) -> None:
    err = spec_error(lambda: Drive("disk.img", **kwargs))
    assert err.field == field
    assert same_value(err.value, value)


@pytest.mark.parametrize("file", ["", "a\nb", "a\x00b", 5])
def test_bad_drive_file(file: object) -> None:
    err = spec_error(lambda: Drive(file))  # type: ignore[arg-type]
    assert err.field == "drive.file"
    assert same_value(err.value, file)


def test_drive_backing_chain_from_the_cli_form() -> None:
    drive = parse_drive("top.qcow2,format=qcow2,backing=qcow2:mid.qcow2,backing=raw:/img/a:b.raw")
    assert drive.backing == ("qcow2:mid.qcow2", "raw:/img/a:b.raw")
    assert drive.backing_chain == ((os.path.abspath("mid.qcow2"), "qcow2"), ("/img/a:b.raw", "raw"))
    assert Drive("t.qcow2", backing=["raw:/b"]).backing == ("raw:/b",)  # type: ignore[arg-type]  # a TOML list


def test_drive_path_becomes_str() -> None:
    assert Drive(Path("/img/a.qcow2")).file == "/img/a.qcow2"


def test_duplicate_ids_across_drives_and_nics() -> None:
    err = spec_error(lambda: VMSpec(drives=(Drive("a.img", id="dev"),), nics=(Nic(id="dev"),)))
    assert (err.field, err.value) == ("id", "dev")
    err = spec_error(lambda: VMSpec(drives=(Drive("a.img", id="d"), Drive("b.img", id="d"))))
    assert (err.field, err.value) == ("id", "d")


def test_spec_parses_drive_and_nic_strings_and_tables() -> None:
    spec = VMSpec(
        drives=["a,,b.img,format=raw", {"file": "c.qcow2", "interface": "nvme"}],  # type: ignore[arg-type]
        nics=["user,hostfwd=2222:22", {"kind": "tap", "ifname": "tap0"}],  # type: ignore[arg-type]
    )
    assert spec.drives == (Drive("a,b.img", format="raw"), Drive("c.qcow2", interface="nvme"))
    assert spec.nics == (Nic(forwards=(PortForward(2222, 22),)), Nic(kind="tap", ifname="tap0"))
    err = spec_error(lambda: VMSpec(drives=["disk.img,if=ide"]))  # type: ignore[arg-type]
    assert (err.field, err.value) == ("drive.interface", "ide")


def test_drives_must_be_a_list() -> None:
    err = spec_error(lambda: VMSpec(drives="a.img"))  # type: ignore[arg-type]
    assert (err.field, err.value) == ("drives", "a.img")


def test_from_dict_drives_given_as_a_string() -> None:
    # `drives = "a.img"` in a TOML file must be refused, not read as five drives 'a', '.', 'i', ...
    err = spec_error(lambda: VMSpec.from_dict({"drives": "a.img"}))
    assert err.field == "drives"


# -- nics and port forwards ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (lambda: Nic(kind="tap"), "nic.ifname", None),
        (lambda: Nic(kind="tap", ifname="this-name-is-too-long"), "nic.ifname", "this-name-is-too-long"),
        (lambda: Nic(kind="tap", ifname="tap,0"), "nic.ifname", "tap,0"),
        (lambda: Nic(ifname="tap0"), "nic.ifname", "tap0"),
        (lambda: Nic(kind="bridge"), "nic.kind", "bridge"),  # type: ignore[arg-type]
        (lambda: Nic(mac="52:54:00:12:34"), "nic.mac", "52:54:00:12:34"),
        (lambda: Nic(mac="52-54-00-12-34-56"), "nic.mac", "52-54-00-12-34-56"),
        (lambda: Nic(mac="52:54:00:12:34:5g"), "nic.mac", "52:54:00:12:34:5g"),
        (lambda: Nic(id="-x"), "nic.id", "-x"),
        (lambda: PortForward(70000, 22), "forward.host_port", 70000),
        (lambda: PortForward(-1, 22), "forward.host_port", -1),
        (lambda: PortForward(2222, 0), "forward.guest_port", 0),
        (lambda: PortForward(2222, 70000), "forward.guest_port", 70000),
        (lambda: PortForward(2222, True), "forward.guest_port", True),
        (lambda: PortForward(2222, 22, protocol="sctp"), "forward.protocol", "sctp"),  # type: ignore[arg-type]
        (lambda: PortForward(2222, 22, host_addr="localhost"), "forward.host_addr", "localhost"),
        (lambda: PortForward(2222, 22, host_addr="::1"), "forward.host_addr", "::1"),
    ],
)
def test_bad_nic_or_forward(make: Callable[[], object], field: str, value: object) -> None:
    err = spec_error(make)
    assert err.field == field
    assert same_value(err.value, value)


def test_tap_ifname_must_be_text() -> None:
    # An int that prints as a valid name must not slip through (argv's quoting needs a str).
    err = spec_error(lambda: Nic(kind="tap", ifname=5))  # type: ignore[arg-type]
    assert err.field == "nic.ifname"


def test_forwards_on_tap() -> None:
    fwd = PortForward(2222, 22)
    err = spec_error(lambda: Nic(kind="tap", ifname="tap0", forwards=(fwd,)))
    assert err.field == "nic.forwards"
    assert err.value == (fwd,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2222:22", PortForward(2222, 22, "tcp", "127.0.0.1")),
        ("udp:5353:53", PortForward(5353, 53, "udp", "127.0.0.1")),
        ("0.0.0.0:8080:80", PortForward(8080, 80, "tcp", "0.0.0.0")),
        ("tcp:10.0.2.2:0:22", PortForward(0, 22, "tcp", "10.0.2.2")),
    ],
)
def test_port_forward_parse(text: str, expected: PortForward) -> None:
    assert PortForward.parse(text) == expected
    assert PortForward.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "22", "x:22", "2222:22:", "1:2:3:4:5", "tcp:", "2222:-22", "sctp:2222:22", "²:22"]
)
def test_port_forward_parse_rejects(text: str) -> None:
    err = spec_error(lambda: PortForward.parse(text))
    assert err.field.startswith("forward")


@given(
    st.builds(
        PortForward,
        st.integers(0, 65535),
        st.integers(1, 65535),
        st.sampled_from(["tcp", "udp"]),
        st.ip_addresses(v=4).map(str),
    )
)
def test_port_forward_str_round_trips(fwd: PortForward) -> None:
    assert PortForward.parse(str(fwd)) == fwd


# -- the CLI string forms ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512M", 512),
        ("2G", 2048),
        ("2GiB", 2048),
        (1024, 1024),
        ("1024K", 1),
        ("1T", 1024 * 1024),
        ("256MB", 256),
        ("4g", 4096),
        (" 64 M ", 64),
        ("100", 100),
    ],
)
def test_parse_size(text: int | str, mib: int) -> None:
    assert same_value(parse_size(text), mib)


@pytest.mark.parametrize("text", ["12Q", "1K", "1.5G", "", "G", "-5M", "2 GB extra", True, 1.0, None])
def test_parse_size_rejects(text: object) -> None:
    err = spec_error(lambda: parse_size(text, "max_memory"))  # type: ignore[arg-type]
    assert err.field == "max_memory"
    assert same_value(err.value, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("disk.qcow2", Drive("disk.qcow2")),
        ("x,y.qcow2", Drive("x,y.qcow2")),
        ("a,b,c.img,format=raw", Drive("a,b,c.img", format="raw")),
        ("a,,b.img,format=raw,overlay", Drive("a,b.img", format="raw", overlay=True)),
        ("disk.img,if=nvme,readonly,id=d1", Drive("disk.img", interface="nvme", read_only=True, id="d1")),
        ("d.img,interface=virtio-scsi,read-only=on", Drive("d.img", interface="virtio-scsi", read_only=True)),
        ("d.img,overlay=off,readonly=false", Drive("d.img")),
        ("/abs/path with space.img", Drive("/abs/path with space.img")),
    ],
)
def test_parse_drive(text: str, expected: Drive) -> None:
    assert parse_drive(text) == expected


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("d.img,if=ide", "drive.interface"),
        ("d.img,format=vmdk", "drive.format"),
        ("d.img,readonly=maybe", "drive.read_only"),
        ("d.img,readonly,overlay", "drive.overlay"),
        ("d.img,id=9", "drive.id"),
        ("d.img,format=raw,cache=none", "disk"),
        (",format=raw", "drive.file"),
    ],
)
def test_parse_drive_rejects(text: str, field: str) -> None:
    assert spec_error(lambda: parse_drive(text)).field == field


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user", Nic()),
        ("", Nic()),
        ("user,hostfwd=2222:22", Nic(forwards=(PortForward(2222, 22, "tcp", "127.0.0.1"),))),
        ("user,hostfwd=0.0.0.0:8080:80", Nic(forwards=(PortForward(8080, 80, "tcp", "0.0.0.0"),))),
        (
            "user,hostfwd=2222:22,fwd=udp:5353:53,id=n1",
            Nic(forwards=(PortForward(2222, 22), PortForward(5353, 53, "udp")), id="n1"),
        ),
        ("tap,ifname=tap0", Nic(kind="tap", ifname="tap0")),
        ("tap,ifname=tap0,mac=52:54:00:ab:cd:ef", Nic(kind="tap", ifname="tap0", mac="52:54:00:ab:cd:ef")),
    ],
)
def test_parse_nic(text: str, expected: Nic) -> None:
    assert parse_nic(text) == expected


def test_parse_nic_forward_binds_loopback_by_default() -> None:
    (fwd,) = parse_nic("user,hostfwd=2222:22").forwards
    assert fwd.host_addr == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tap", "nic.ifname"),
        ("tap,ifname=tap0,hostfwd=2222:22", "nic.forwards"),
        ("user,hostfwd=22", "forward"),
        ("user,hostfwd=localhost:2222:22", "forward.host_addr"),
        ("user,hostfwd=70000:22", "forward.host_port"),
        ("user,model=e1000", "nic"),
        ("vde", "nic.kind"),
    ],
)
def test_parse_nic_rejects(text: str, field: str) -> None:
    assert spec_error(lambda: parse_nic(text)).field == field


# -- TOML ------------------------------------------------------------------------------


def full_spec() -> VMSpec:
    """A spec that sets every field away from its default, with awkward text."""
    return VMSpec(
        name="full.spec-1",
        machine="pc",
        accel="kvm",
        cpu="host,-arch-capabilities",
        cpus=2,
        max_cpus=4,
        memory="1G",  # type: ignore[arg-type]
        max_memory="4G",  # type: ignore[arg-type]
        slots=2,
        kernel='/boot/my "kernel",v1\\vmlinuz',
        initrd="/boot/ïnitrd 😀.img",
        append="console=ttyS0 init=\"/bin/sh -c 'x'\"\nsecond line, a\\b\ttab ünï 😀",
        firmware="ovmf",
        drives=(
            Drive('/img/a,b "c".qcow2', format="qcow2", interface="virtio-scsi", overlay=True, id="root",
                  backing=('raw:/img/base:1,"x".raw',)),
            Drive("C:\\img\\ro,,x.raw", format="raw", interface="nvme", read_only=True),
        ),
        nics=(
            Nic(forwards=(PortForward(2222, 22), PortForward(5353, 53, "udp", "0.0.0.0"))),
            Nic(kind="tap", ifname="tap0", mac="52:54:00:12:34:56", id="lan"),
        ),
        shares=(
            Share('/src/my "tree",x', "/mnt/src", tag="src", read_only=True, transport="9p"),
            Share("/data"),
        ),
        serial=False,
        agent=False,
        no_reboot=True,
        hotplug_ports=8,
        sandbox=False,
        run_as="nobody",
        qmp_tcp_port=4444,
        gdb_port=1234,
        gdb_wait=True,
        extra_args=("-S", "-device", "virtio-rng-pci,id=rng0", "", 'a "q" \\ b'),
        cloud_init=CloudInit(hostname="full-spec.example", ssh_key='/keys/my "key",x.pub',
                             user_data="/ud/ünï 😀\\data", ssh_user="admin"),
        warm=True,
        forward_auto=False,  # True needs an agent and a user network: see the tests below
        networks=("lan", "db-2"),
        tb_size=128,
        host_root=HostRoot(rw=("/out",), transport="9p"),
        standby=True,
    )


def test_full_spec_sets_every_field() -> None:
    # Guards the round-trip tests below: a new field must be added to full_spec().
    spec = full_spec()
    defaults = VMSpec()
    for f in dataclasses.fields(VMSpec):
        if f.name == "arch":  # OVMF and cloud-init are x86_64-only: see test_arch.py's round trip
            continue
        assert getattr(spec, f.name) != getattr(defaults, f.name), f.name
    for cls, parts in ((Drive, spec.drives), (Nic, spec.nics), (Share, spec.shares),
                       (CloudInit, (spec.cloud_init,)), (HostRoot, (spec.host_root,))):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            assert any(getattr(p, f.name) != default for p in parts), f"{cls.__name__}.{f.name}"


def test_dumps_round_trips() -> None:
    spec = full_spec()
    text = spec.dumps()
    assert VMSpec.from_dict(tomllib.loads(text)) == spec


def test_dump_and_load_file(tmp_path: Path) -> None:
    spec = full_spec()
    path = tmp_path / "vm.toml"
    spec.dump(path)
    assert VMSpec.load(path) == spec
    assert VMSpec.load(str(path)) == spec


def test_default_spec_round_trips() -> None:
    assert VMSpec.from_dict(tomllib.loads(VMSpec().dumps())) == VMSpec()


def test_to_dict_is_plain_data() -> None:
    data = full_spec().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert "name" not in VMSpec().to_dict()


# BMP text without surrogates; the planes above are covered by explicit tests below.
_bmp_text = st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"])


@given(
    path=st.text(_bmp_text.filter(lambda c: c not in "\x00\n"), min_size=1),
    append=st.text(_bmp_text.filter(lambda c: c != "\x00")),
    extra=st.lists(st.text(_bmp_text.filter(lambda c: c != "\x00"))),
)
def test_dumps_round_trips_any_text(path: str, append: str, extra: list[str]) -> None:
    spec = VMSpec(kernel=path, append=append, drives=(Drive(path),), extra_args=tuple(extra))
    assert VMSpec.from_dict(tomllib.loads(spec.dumps())) == spec


@pytest.mark.parametrize(
    "text",
    ["emoji \U0001f600", "tag \U000e0001 char", "private use \U000f0000"],
    ids=["printable", "tag", "private"],
)
def test_dumps_round_trips_text_beyond_bmp(text: str) -> None:
    # Non-printable characters above U+FFFF need TOML's 8-digit \U escape.
    spec = VMSpec(kernel="/k", append=text)
    assert VMSpec.from_dict(tomllib.loads(spec.dumps())).append == text


def test_dumps_of_undecodable_path_fails_cleanly() -> None:
    # os.fsdecode() of a non-UTF-8 file name yields lone surrogates; a spec holding one
    # must either round-trip or be refused with a SpecError, never dump unreadable TOML.
    try:
        spec = VMSpec(drives=(Drive("/img/caf\udce9.img"),))
        text = spec.dumps()
    except SpecError as exc:
        assert exc.field == "drive.file"
        return
    assert VMSpec.from_dict(tomllib.loads(text)) == spec


def test_load_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('name = "a"\nmemroy = "1G"\n')
    err = spec_error(lambda: VMSpec.load(path))
    assert (err.field, err.value) == ("memroy", "1G")


def test_load_unknown_key_in_a_table(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('[[drives]]\nfile = "a.img"\ncache = "none"\n')
    err = spec_error(lambda: VMSpec.load(path))
    assert (err.field, err.value) == ("drives.cache", "none")


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('name = "unterminated\n')
    err = spec_error(lambda: VMSpec.load(path))
    assert err.field == "file"
    assert err.value == str(path)
    assert "TOML" in err.reason


def test_load_missing_file(tmp_path: Path) -> None:
    err = spec_error(lambda: VMSpec.load(tmp_path / "nope.toml"))
    assert (err.field, err.value) == ("file", str(tmp_path / "nope.toml"))


def test_load_validates_values(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text('memory = "12Q"\n')
    err = spec_error(lambda: VMSpec.load(path))
    assert (err.field, err.value) == ("memory", "12Q")


def test_replace_validates_again() -> None:
    spec = VMSpec(cpus=2)
    assert spec.replace(memory="1G").memory == 1024
    err = spec_error(lambda: spec.replace(cpus=0))
    assert (err.field, err.value) == ("cpus", 0)


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        VMSpec().cpus = 2  # type: ignore[misc]


# --------------------------------------------------------------------------- forward_auto


def test_forward_auto_needs_a_user_network_and_an_agent_naming_the_field() -> None:
    with pytest.raises(SpecError) as no_nic:
        VMSpec(forward_auto=True)
    assert no_nic.value.field == "forward_auto" and "user network" in str(no_nic.value)
    with pytest.raises(SpecError) as tap_only:
        VMSpec(forward_auto=True, nics=(Nic(kind="tap", ifname="tap0"),))
    assert tap_only.value.field == "forward_auto"
    with pytest.raises(SpecError) as no_agent:
        VMSpec(forward_auto=True, nics=(Nic(),), agent="none")
    assert no_agent.value.field == "forward_auto" and "agent" in str(no_agent.value)
    with pytest.raises(SpecError) as not_bool:
        VMSpec(forward_auto="yes", nics=(Nic(),))  # type: ignore[arg-type]
    assert not_bool.value.field == "forward_auto"
    assert VMSpec(forward_auto=True, nics=(Nic(),), agent="qga").forward_auto is True
    assert VMSpec(agent="none").forward_auto is None  # off by default, nothing needed


def test_forward_auto_round_trips_through_toml(tmp_path: Path) -> None:
    spec = VMSpec(forward_auto=True, nics=(Nic(),))
    assert "forward_auto = true" in spec.dumps()
    path = tmp_path / "vm.toml"
    spec.dump(path)
    assert VMSpec.load(path) == spec
    assert "forward_auto" not in VMSpec().dumps()  # unset stays unset (and warm keys with it)
