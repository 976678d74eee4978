"""cloud-init seeds (read back with pycdlib), the seed CD's argv, ssh plumbing, --keep, the recipe."""

from __future__ import annotations

import asyncio
import email
import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pycdlib
import pytest
import yaml

from qemukit import Drive, HostError, Nic, PortForward, SpecError, StateError, VMSpec, WaitTimeout
from qemukit._launch.seed import (
    KNOWN_HOSTS_FILE,
    SSH_OPTIONS_SAFE,
    SSH_OPTIONS_THROWAWAY,
    build_seed,
    default_user_data,
    host_key_alias,
    identity_file,
    known_hosts_file,
    parse_usernet,
    read_seed_iso,
    seed_device_args,
    ssh_argv,
    wait_for_ssh,
    write_known_hosts,
)
from qemukit.images import debian
from qemukit.spec import CloudInit

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000000 me@host"


@pytest.fixture
def pubkey(tmp_path: Path) -> Path:
    path = tmp_path / "id_test.pub"
    path.write_text(PUBKEY + "\n")
    return path


def _meta(iso: Path) -> dict[str, object]:
    return dict(json.loads(read_seed_iso(iso)["meta-data"]))


# -- the ISO ------------------------------------------------------------------------------------


def test_seed_iso_has_cidata_label_and_both_names(tmp_path: Path, pubkey: Path) -> None:
    seed = build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "box")
    iso = pycdlib.PyCdlib()
    iso.open(str(seed.iso))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        joliet = sorted(c.file_identifier().decode("utf-16_be")
                        for c in iso.list_children(joliet_path="/") if not c.is_dot()
                        and not c.is_dotdot())
        assert joliet == ["meta-data", "user-data"]
    finally:
        iso.close()
    files = read_seed_iso(seed.iso)
    assert set(files) == {"meta-data", "user-data"}
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert default_user_data().startswith(b"#cloud-config\n")


def test_meta_data_carries_hostname_keys_and_instance_id(tmp_path: Path, pubkey: Path) -> None:
    seed = build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "My_Box.1")
    meta = _meta(seed.iso)
    assert meta["local-hostname"] == "my-box-1" == seed.hostname  # a valid host name
    assert meta["public-keys"] == [PUBKEY]
    assert meta["instance-id"] == seed.instance_id
    assert seed.instance_id.startswith("qemukit-My_Box.1-")
    assert seed.identity is None  # the user's own key: qemukit holds no private key
    explicit = build_seed(CloudInit(ssh_key=str(pubkey), hostname="web.test"), tmp_path, "x")
    assert _meta(explicit.iso)["local-hostname"] == "web.test"


def test_user_data_passes_through_byte_for_byte(tmp_path: Path, pubkey: Path) -> None:
    user_data = tmp_path / "ud"
    payload = b"#cloud-config\nruncmd:\n  - [sh, -c, 'echo \xc3\xbc > /x']\n\x00tail"
    user_data.write_bytes(payload)
    seed = build_seed(CloudInit(ssh_key=str(pubkey), user_data=str(user_data)), tmp_path, "vm")
    files = read_seed_iso(seed.iso)
    # beside qemukit's host-key part in a MIME multipart, the user's part byte for byte
    parts = user_data_parts(files["user-data"])
    assert parts[0] == ("text/plain", payload)
    assert parts[1][0] == "text/cloud-config"
    # the keys still come with the meta-data, so a user's file need not repeat them
    assert json.loads(files["meta-data"])["public-keys"] == [PUBKEY]
    assert seed.host_keys is not None  # so pinned


def user_data_parts(data: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(data)
    assert msg.is_multipart()
    parts = msg.get_payload()
    assert isinstance(parts, list)
    out = []
    for part in parts:
        assert isinstance(part, email.message.Message)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


def _cloud_config(data: bytes) -> dict[str, object]:
    assert data.startswith(b"#cloud-config\n")
    return dict(yaml.safe_load(data))


def test_the_seed_gives_the_guest_host_keys_and_pins_them(tmp_path: Path, pubkey: Path) -> None:
    seed = build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "box")
    assert seed.host_keys is not None
    assert sorted(seed.host_keys) == ["ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub",
                                      "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    config = _cloud_config(read_seed_iso(seed.iso)["user-data"])
    keys = config["ssh_keys"]
    assert isinstance(keys, dict)
    assert keys["ed25519_public"] == seed.host_keys["ssh_host_ed25519_key.pub"].decode()
    assert keys["ed25519_private"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert "bootcmd" in config  # the same keys again on every boot (a kept disk)
    known = tmp_path / KNOWN_HOSTS_FILE
    assert known_hosts_file(tmp_path) == known
    assert known.stat().st_mode & 0o077 == 0
    lines = known.read_text().splitlines()
    ed = seed.host_keys["ssh_host_ed25519_key.pub"].decode().split()
    assert f"{host_key_alias('box')} {ed[0]} {ed[1]}" in lines and len(lines) == 2


def test_host_keys_are_not_pinned_when_the_user_data_sets_them_or_is_mime(
        tmp_path: Path, pubkey: Path) -> None:
    own = tmp_path / "own"
    own.write_text("#cloud-config\nssh_keys:\n  ed25519_private: x\n")
    build_seed(CloudInit(ssh_key=str(pubkey), user_data=str(own)), tmp_path, "vm")
    assert known_hosts_file(tmp_path) is None
    mime = tmp_path / "mime"
    mime.write_bytes(b"Content-Type: multipart/mixed; boundary=x\n\n--x--\n")
    seed = build_seed(CloudInit(ssh_key=str(pubkey), user_data=str(mime)), tmp_path, "vm")
    assert seed.host_keys is None and known_hosts_file(tmp_path) is None
    assert read_seed_iso(seed.iso)["user-data"] == mime.read_bytes()


def test_instance_id_follows_the_seed_content(tmp_path: Path, pubkey: Path) -> None:
    a = build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "vm").instance_id
    assert build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "vm").instance_id == a
    ud = tmp_path / "ud"
    ud.write_text("#cloud-config\n{}\n# changed\n")
    assert build_seed(CloudInit(ssh_key=str(pubkey), user_data=str(ud)), tmp_path, "vm").instance_id != a
    assert build_seed(CloudInit(ssh_key=str(pubkey)), tmp_path, "other").instance_id != a


def test_generated_keypair_lands_in_the_runtime_dir(tmp_path: Path) -> None:
    seed = build_seed(CloudInit(), tmp_path, "vm")
    assert seed.identity == tmp_path / "ssh_key"
    assert seed.identity.stat().st_mode & 0o077 == 0  # ssh refuses a readable private key
    public = (tmp_path / "ssh_key.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ") and public.endswith("qemukit@vm")
    assert _meta(seed.iso)["public-keys"] == [public]
    assert identity_file(CloudInit(), tmp_path) == seed.identity


def test_a_private_key_or_missing_file_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "id"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(SpecError, match="not an SSH public key"):
        build_seed(CloudInit(ssh_key=str(private)), tmp_path, "vm")
    with pytest.raises(SpecError, match="cannot read"):
        build_seed(CloudInit(ssh_key=str(tmp_path / "nope.pub")), tmp_path, "vm")
    with pytest.raises(SpecError, match="cannot read"):
        build_seed(CloudInit(user_data=str(tmp_path / "nope")), tmp_path, "vm")


def test_identity_file_is_the_private_half_of_a_given_key(tmp_path: Path, pubkey: Path) -> None:
    assert identity_file(None, tmp_path) is None
    # no private half here: the .pub itself, so ssh uses the agent's matching key and no other
    assert identity_file(CloudInit(ssh_key=str(pubkey)), tmp_path) == pubkey
    (tmp_path / "id_test").write_text("private")
    assert identity_file(CloudInit(ssh_key=str(pubkey)), tmp_path) == tmp_path / "id_test"
    assert identity_file(CloudInit(), tmp_path) is None  # nothing generated yet


# -- the spec field ----------------------------------------------------------------------------


def test_cloud_init_round_trips_through_toml() -> None:
    spec = VMSpec(cloud_init=CloudInit(hostname="h", ssh_key="/k,1.pub", user_data="/u \"x\""))
    assert VMSpec.from_dict(tomllib.loads(spec.dumps())) == spec
    assert VMSpec.from_dict({"cloud_init": {}}).cloud_init == CloudInit()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"hostname": "Bad_Name"}, "cloud_init.hostname"),
    ({"hostname": "a" * 64}, "cloud_init.hostname"),
    ({"ssh_user": "Root!"}, "cloud_init.ssh_user"),
    ({"ssh_key": "a\nb"}, "cloud_init.ssh_key"),
    ({"user_data": ""}, "cloud_init.user_data"),
])
def test_cloud_init_validation(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(SpecError) as info:
        CloudInit(**kwargs)
    assert info.value.field == field


def test_spec_refuses_seed_on_microvm_and_cidata_ids() -> None:
    with pytest.raises(SpecError, match="microvm"):
        VMSpec(machine="microvm", kernel="/k", cloud_init=CloudInit())
    with pytest.raises(SpecError, match="cidata"):
        VMSpec(drives=(Drive("/d", id="cidata1"),), cloud_init=CloudInit())
    with pytest.raises(SpecError, match="unknown field"):
        VMSpec.from_dict({"cloud_init": {"password": "x"}})
    VMSpec(drives=(Drive("/d", id="cidata1"),))  # without a seed the id is free


# -- the seed CD's argv -------------------------------------------------------------------------


def test_seed_cd_gets_its_own_scsi_controller() -> None:
    args = seed_device_args(VMSpec(drives=(Drive("/a.qcow2"),)), "/run/x,y/seed.iso")
    assert args == [
        "-blockdev", "driver=file,node-name=cidata-file,filename=/run/x,,y/seed.iso,read-only=on",
        "-blockdev", "driver=raw,node-name=cidata-fmt,file=cidata-file,read-only=on",
        "-device", "virtio-scsi-pci,id=scsi1",
        "-device", "scsi-cd,bus=scsi1.0,drive=cidata-fmt,id=cidata0",
    ]


def test_seed_cd_shares_the_spec_scsi_controller() -> None:
    args = seed_device_args(VMSpec(drives=(Drive("/a.qcow2", interface="virtio-scsi"),)), "/s.iso")
    assert "virtio-scsi-pci,id=scsi1" not in args
    assert args[-1] == "scsi-cd,bus=scsi0.0,drive=cidata-fmt,id=cidata0"


# -- reaching the guest -------------------------------------------------------------------------

USERNET = """\
Hub -1 (net0-backend):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[ESTABLISHED]   21       127.0.0.1 50312       10.0.2.15    22     0     0
  TCP[HOST_FORWARD]  13       127.0.0.1 40043       10.0.2.15    22     0     0
  UDP[HOST_FORWARD]   3         0.0.0.0 58291       10.0.2.15    53     0     0
Hub -1 (lan-backend):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  14       127.0.0.1  8080       10.0.2.15    80     0     0
"""


def test_parse_usernet_reads_bound_forwards_only() -> None:
    forwards = parse_usernet(USERNET)
    assert [(f.netdev, f.protocol, f.host_addr, f.host_port, f.guest_port) for f in forwards] == [
        ("net0-backend", "tcp", "127.0.0.1", 40043, 22),
        ("net0-backend", "udp", "0.0.0.0", 58291, 53),
        ("lan-backend", "tcp", "127.0.0.1", 8080, 80),
    ]
    assert parse_usernet("") == []


def _opts(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "-o"]


def test_ssh_argv_offers_one_key_reads_no_user_config_and_forwards_nothing() -> None:
    argv = ssh_argv("127.0.0.1", 40043, "debian", Path("/rt/ssh_key"), ["true"])
    assert argv[:5] == ["ssh", "-p", "40043", "-l", "debian"]
    assert argv[argv.index("-F") + 1] == "/dev/null"  # ~/.ssh/config and /etc/ssh/ssh_config
    assert argv[argv.index("-i") + 1] == "/rt/ssh_key"
    opts = _opts(argv)
    for opt in ("IdentitiesOnly=yes", "ForwardAgent=no", "ForwardX11=no", "ProxyCommand=none",
                "ProxyJump=none", "PermitLocalCommand=no", "ControlMaster=no",
                "UpdateHostKeys=no", "GlobalKnownHostsFile=/dev/null"):
        assert opt in opts
    assert all(opt in argv for opt in SSH_OPTIONS_SAFE)


def test_ssh_argv_pins_known_host_keys_and_says_when_it_cannot(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    pinned = ssh_argv("127.0.0.1", 2222, "root", None, known_hosts=known, alias="qemukit-vm")
    assert {"StrictHostKeyChecking=yes", f"UserKnownHostsFile={known}",
            "HostKeyAlias=qemukit-vm"} <= set(_opts(pinned))
    assert "StrictHostKeyChecking=no" not in pinned
    loose = ssh_argv("127.0.0.1", 2222, "root", None)
    assert all(opt in loose for opt in SSH_OPTIONS_THROWAWAY)
    assert "-i" not in loose and "IdentitiesOnly=yes" in loose


def test_ssh_argv_keeps_each_word_of_the_command_intact() -> None:
    argv = ssh_argv("127.0.0.1", 40043, "debian", None, ["sh", "-c", "echo a | cat"])
    assert argv[-3:-1] == ["127.0.0.1", "--"]
    # ssh hands the remote shell one string; that shell splits it back into the same argv
    remote = argv[-1]
    assert shlex.split(remote) == ["sh", "-c", "echo a | cat"]
    out = subprocess.run(["sh", "-c", remote], capture_output=True, text=True, check=True)
    assert out.stdout == "a\n"
    odd = ["printf", "%s|", "a b", ";id", "$(id)", "'q'", "", "*"]
    out = subprocess.run(["sh", "-c", ssh_argv("h", 1, "u", None, odd)[-1]],
                         capture_output=True, text=True, check=True)
    assert out.stdout == "a b|;id|$(id)|'q'||*|"


def test_an_explicit_option_of_the_caller_comes_first_so_it_wins() -> None:
    argv = ssh_argv("127.0.0.1", 1, "u", None, options=("-o", "ForwardAgent=yes"))
    assert argv.index("ForwardAgent=yes") < argv.index("ForwardAgent=no")
    assert "-a" not in argv and "-x" not in argv  # flags would override the -o (seen in a guest)


def test_write_known_hosts_refuses_what_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="not an ssh public key"):
        write_known_hosts(tmp_path / "k", "a", ["evil\n* ssh-ed25519 AAAA"])


def test_wait_for_ssh_retries_until_a_login_works(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    script = (f"import sys,pathlib; p=pathlib.Path({str(counter)!r}); n=int(p.read_text())+1; "
              "p.write_text(str(n)); sys.exit(0 if n >= 3 else 255)")
    attempts = asyncio.run(wait_for_ssh([sys.executable, "-c", script], 20))
    assert attempts == 3


def test_wait_for_ssh_is_bounded(tmp_path: Path) -> None:
    script = "import sys; print('Connection refused', file=sys.stderr); sys.exit(255)"
    with pytest.raises(WaitTimeout, match="Connection refused"):
        asyncio.run(wait_for_ssh([sys.executable, "-c", script], 1.0))


# -- --keep and the image recipe ------------------------------------------------------------------


def test_keep_disks_makes_a_persistent_overlay_and_key(tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit.cli._guest import keep_disks

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 1024 * 1024)
    base.chmod(0o444)
    spec = VMSpec(name="keeper", drives=(Drive(base, overlay=True), Drive(tmp_path / "other.raw")),
                  nics=(Nic(forwards=(PortForward(0, 22),)),), cloud_init=CloudInit())
    kept, directory = keep_disks(spec)
    assert directory == tmp_path / "data/qemukit/disks/keeper"
    first = kept.drives[0]
    assert (first.file, first.format, first.overlay) == (str(directory / "disk0.qcow2"), "qcow2", False)
    assert first.backing == (f"raw:{base}",)  # named: the next start opens exactly it
    assert kept.drives[1] == spec.drives[1]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", first.file],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str(base)
    assert kept.cloud_init is not None and kept.cloud_init.ssh_key == str(directory / "ssh_key.pub")
    # a second --keep run of the same name boots the same overlay with the same key
    mtime = Path(first.file).stat().st_mtime_ns
    again, _ = keep_disks(spec)
    assert again == kept and Path(first.file).stat().st_mtime_ns == mtime
    # a rebuilt base would turn the kept overlay into garbage: refused, with what to do
    base.chmod(0o644)
    base.write_bytes(b"\1" * 1024 * 1024)
    with pytest.raises(StateError, match="delete"):
        keep_disks(spec)


def test_recipe_package_list() -> None:
    packages = debian.read_package_list(Path(__file__).parents[2] / "images" / "debian")
    for needed in ("systemd-sysv", "openssh-server", "qemu-guest-agent", "cloud-init",
                   "linux-image-cloud-amd64", "initramfs-tools", "e2fsprogs"):
        assert needed in packages
    assert all(not p.startswith("#") for p in packages)


def test_recipe_package_list_refuses_bad_names(tmp_path: Path) -> None:
    (tmp_path / "packages").write_text("ok-pkg\nbad;name\n")
    with pytest.raises(RuntimeError, match="bad package name"):
        debian.read_package_list(tmp_path)


def test_debian_spec_boots_an_overlay_with_seed_and_agent(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import images

    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    fake = debian.DebianImage(tmp_path / "disk.qcow2", tmp_path / "vmlinuz", tmp_path / "initrd.img",
                              "6.1.0-test", tmp_path, {})
    monkeypatch.setattr(images, "find_debian", lambda cache, **build: fake)
    spec = images.spec("debian", accel="tcg")
    assert (spec.agent, spec.cpus, spec.memory, spec.machine) == ("qga", 2, 1024, "q35")
    assert spec.drives == (Drive(str(fake.disk), format="qcow2", overlay=True),)
    assert spec.nics[0].forwards == (PortForward(0, 22, "tcp", "127.0.0.1"),)
    assert spec.cloud_init == CloudInit()
    assert spec.kernel == str(fake.kernel) and spec.initrd == str(fake.initrd)
    assert "root=/dev/vda" in (spec.append or "") and "console=ttyS0" in (spec.append or "")
    monkeypatch.setattr(images, "find_debian", lambda cache, **build: None)
    with pytest.raises(HostError, match="images build debian"):
        images.spec("debian")
