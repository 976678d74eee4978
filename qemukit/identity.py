"""A restored clone becomes its own machine: host name, machine id, MACs, ssh host keys, login key.

A warm state of a cloud-init guest is saved once its first boot is done, so
everything cloud-init made per instance is the builder's: its host name,
``/etc/machine-id``, ssh host keys, the key it authorized, and (unless the
spec names one) the MAC every NIC got from QEMU. :func:`reidentify` gives the
running clone the identity its own seed describes, in one agent command:

- the host name (``hostname``, ``/etc/hostname``, the ``127.0.1.1`` line
  cloud-init's ``manage_etc_hosts`` keeps);
- a new ``/etc/machine-id``;
- a new locally administered MAC for each NIC the spec leaves to QEMU, set
  by the guest (``ip link set address``), which virtio-net passes to QEMU:
  ``query-rx-filter`` then shows it, with a gratuitous ARP (``arp_notify``)
  so the network learns it at once;
- new ssh host keys (ed25519 and ECDSA, made on the host, where it takes
  milliseconds: RSA would cost seconds and is not offered), then sshd reloaded;
- the seed's public keys as the login user's ``authorized_keys`` (the builder's
  own key is gone with it);
- host bytes mixed into ``/dev/urandom``.

The seed CD the clone carries is its own (new instance id), so a reboot of
the clone lets cloud-init see a new instance and agree with all this.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._launch.argv import nic_ids
from ._launch.seed import HOST_KEY_TYPES, generate_host_keys
from ._wire.agent import ExecResult
from .errors import StateError
from .spec import VMSpec

__all__ = ["HOST_KEY_TYPES", "RESEED_STEPS", "CloneIdentity", "host_keys", "random_mac", "reidentify",
           "reseed_program", "reseed_script", "static_elf"]


# $1 host name, $2 machine id, $3 login user, $4 authorized_keys (base64), $5 MAC pairs
# ("old=new ..."), $6 host entropy (hex), then (file name, base64) pairs of host key files.
_SCRIPT = r"""
set -eu
host=$1 mid=$2 user=$3 keys=$4 macs=$5 entropy=$6
shift 6
printf '%s\n' "$entropy" > /dev/urandom
hostname "$host"
printf '%s\n' "$host" > /etc/hostname
if [ -f /etc/hosts ] && grep -q '^127\.0\.1\.1[[:space:]]' /etc/hosts; then
    sed -i "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1 $host $host/" /etc/hosts
fi
printf '%s\n' "$mid" > /etc/machine-id
for pair in $macs; do
    old=${pair%%=*} new=${pair#*=}
    for dev in /sys/class/net/*; do
        if [ "$(cat "$dev/address")" = "$old" ]; then
            # A gratuitous ARP at the change: user-mode networking (and any switch) keeps
            # sending to the old MAC, which the NIC now drops, until it hears the new one.
            echo 1 > "/proc/sys/net/ipv4/conf/${dev##*/}/arp_notify"
            ip link set dev "${dev##*/}" address "$new"
        fi
    done
done
if [ $# -gt 0 ] && [ -d /etc/ssh ]; then
    rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
    while [ $# -gt 1 ]; do
        printf '%s' "$2" | base64 -d > "/etc/ssh/$1"
        case $1 in *.pub) chmod 644 "/etc/ssh/$1" ;; *) chmod 600 "/etc/ssh/$1" ;; esac
        shift 2
    done
    if [ -d /etc/ssh/sshd_config.d ]; then
        for t in ed25519 ecdsa; do echo "HostKey /etc/ssh/ssh_host_${t}_key"; done \
            > /etc/ssh/sshd_config.d/50-qemukit-host-keys.conf
    fi
fi
home=
if [ -n "$user" ]; then
    home=$(getent passwd "$user" | cut -d: -f6)
fi
if [ -n "$home" ]; then
    mkdir -p "$home/.ssh"
    printf '%s' "$keys" | base64 -d > "$home/.ssh/authorized_keys"
    chmod 700 "$home/.ssh"
    chmod 600 "$home/.ssh/authorized_keys"
    chown -R "$user:" "$home/.ssh"
fi
for unit in ssh sshd; do
    if systemctl is-active --quiet "$unit" 2>/dev/null; then
        systemctl reload-or-restart "$unit"
        break
    fi
done
"""


@dataclass(frozen=True)
class CloneIdentity:
    """What a clone was given after its restore."""

    hostname: str
    machine_id: str
    #: NIC device id -> the MAC it has now (only NICs whose MAC the spec left to QEMU).
    macs: Mapping[str, str]
    #: Host key type -> the public key line the clone's sshd now presents.
    host_keys: Mapping[str, str]


class _Target(Protocol):
    """What :func:`reidentify` needs of a VM."""

    @property
    def spec(self) -> VMSpec: ...

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = ...) -> Any: ...

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = ...,
                   check: bool = ..., stdin: bytes | None = ...) -> ExecResult: ...


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00, random in its last three bytes."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def host_keys(comment: str, types: Sequence[str] = HOST_KEY_TYPES) -> dict[str, bytes]:
    """New ssh host key files (``ssh_host_<type>_key`` and ``.pub``) made with ssh-keygen."""
    return generate_host_keys(comment, types)


async def reidentify(vm: _Target, hostname: str, public_keys: Sequence[str], *,
                     keys: Mapping[str, bytes] | None = None,
                     timeout: float = 60.0) -> CloneIdentity:
    """Give the running clone ``vm`` its own identity (see the module's docstring).

    ``keys`` are host key files from :func:`host_keys` (made here if None; ``{}``
    for a guest without sshd); a clone is given its seed's (:attr:`qemukit.seed.Seed.host_keys`), the ones
    pinned in its known_hosts and the ones cloud-init installs if it reboots.
    Raises :class:`StateError` with the guest's stderr if the command fails.
    """
    spec = vm.spec
    if keys is None:
        keys = await asyncio.to_thread(host_keys, f"root@{hostname}")
    chosen = {dev_id: nic for dev_id, nic in zip(nic_ids(spec), spec.nics, strict=True)
              if nic.mac is None}
    macs: dict[str, str] = {}
    pairs = []
    if chosen:
        filters = await vm.qmp("query-rx-filter")
        for entry in filters:
            if entry.get("name") in chosen:
                new = random_mac()
                macs[entry["name"]] = new
                pairs.append(f"{entry['main-mac']}={new}")
    machine_id = uuid.uuid4().hex
    # A guest without cloud-init (a fork of the tiny image) has no login user to authorize.
    user = spec.cloud_init.ssh_user if spec.cloud_init is not None else ""
    argv = ["sh", "-c", _SCRIPT, "qemukit-identity", hostname, machine_id, user,
            base64.b64encode("".join(k + "\n" for k in public_keys).encode()).decode(),
            " ".join(pairs), secrets.token_hex(64)]
    for name, data in sorted(keys.items()):
        argv += [name, base64.b64encode(data).decode()]
    result = await vm.exec(argv, timeout=timeout)
    if result.exit_status != 0:
        raise StateError(f"giving the restored clone its own identity failed (exit "
                         f"{result.exit_status}): {result.stderr_text.strip()[-500:]}")
    presented = {name.removeprefix("ssh_host_").removesuffix("_key.pub"): data.decode().strip()
                 for name, data in keys.items() if name.endswith(".pub")}
    return CloneIdentity(hostname, machine_id, macs, presented)


# -- the RNG reseed of a restored clone ------------------------------------------------
#
# A restored clone resumes with the saved kernel RNG state: every clone of one warm
# state would hand out the same "random" bytes until its kernel next reseeds. Writing
# host bytes to /dev/urandom only mixes them into the input pool (Linux 5.18+ does not
# reseed the crng on a write), and vmgenid, which does make the kernel reseed, needs a
# driver the tiny image's cloud kernel lacks. So qemukit runs, as the clone's first
# command, a static x86_64 program of 346 bytes made here with fresh host bytes
# in it: RNDADDENTROPY (mix and credit them) then RNDRESEEDCRNG (reseed now); both need
# CAP_SYS_ADMIN, which the agent (root) has. It also deletes itself and, when given a
# time, sets the clock (one process instead of date, rm and the rest: each process
# costs tens of milliseconds under TCG). Its exit status says which step failed.
# The code, assembled with GNU as (tests/unit/test_reseed.py checks these bytes):
#
#     mov rdi, [rsp+8]; mov eax, 87; syscall                     # unlink(argv[0])
#     mov edi, 4; mov rax, [rip+ts]; test rax, rax; jz rng       # no time given: skip
#     mov eax, 227; xor edi, edi; lea rsi, [rip+ts]; syscall     # clock_settime(REALTIME)
#     mov edi, 4; test rax, rax; jnz done
#     rng: mov eax, 2; lea rdi, [rip+path]; mov esi, 1; xor edx, edx; syscall  # open
#     mov edi, 1; test rax, rax; js done; mov r12, rax
#     mov eax, 16; mov rdi, r12; mov esi, 0x40085203; lea rdx, [rip+info]; syscall
#     mov edi, 2; test rax, rax; jnz done                        # RNDADDENTROPY
#     mov eax, 16; mov rdi, r12; mov esi, 0x5207; xor edx, edx; syscall
#     mov edi, 3; test rax, rax; jnz done                        # RNDRESEEDCRNG
#     xor edi, edi
#     done: mov eax, 60; syscall                                 # exit(edi)
#     path: .asciz "/dev/urandom"
#     ts: (struct timespec, 16 bytes)  info: (struct rand_pool_info: bits, bytes, bytes)
_RESEED_CODE = bytes.fromhex(
    "488b7c2408b8570000000f05bf04000000488b05920000004885c0741ab8e300000031ff488d357f000000"
    "0f05bf040000004885c0755fb802000000488d3d5a000000be0100000031d20f05bf010000004885c07840"
    "4989c4b8100000004c89e7be03520840488d154d0000000f05bf020000004885c0751db8100000004c89e7"
    "be0752000031d20f05bf030000004885c0750231ffb83c0000000f052f6465762f7572616e646f6d00")

#: What the reseed program's exit status means.
RESEED_STEPS = {1: "open /dev/urandom", 2: "RNDADDENTROPY", 3: "RNDRESEEDCRNG",
                4: "clock_settime", 5: "writing the program to /run"}

_LOAD_ADDRESS = 0x400000


def static_elf(code: bytes) -> bytes:
    """A minimal static x86_64 Linux executable: ``code`` loaded read+execute, run from its start.

    ``code`` must be position independent (rip-relative) and end with an exit
    system call; no sections, no libc.
    """
    ehdr_size, phdr_size = 64, 56
    entry = _LOAD_ADDRESS + ehdr_size + phdr_size
    size = ehdr_size + phdr_size + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)          # 64-bit, little endian, SysV
            + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry,  # ET_EXEC, x86-64
                          ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _LOAD_ADDRESS, _LOAD_ADDRESS,  # PT_LOAD, R+X
                       size, size, 0x1000)
    return ehdr + phdr + code


def reseed_program(entropy: bytes, clock_ns: int | None = None) -> bytes:
    """The reseed program (see above) carrying ``entropy`` (host bytes, credited in full),
    and setting the clock to ``clock_ns`` (ns since the epoch) unless None."""
    ts = struct.pack("<qq", *divmod(clock_ns, 10**9)) if clock_ns else bytes(16)
    info = struct.pack("<ii", 8 * len(entropy), len(entropy)) + entropy
    return static_elf(_RESEED_CODE + ts + info)


def reseed_script(*, set_clock: bool = False) -> str:
    """Shell code that writes a fresh reseed program (32 host bytes; the host's time with
    ``set_clock``) and runs it; its exit status is the program's (see :data:`RESEED_STEPS`).

    It tries ``/run``, then ``/dev/shm`` and ``/tmp`` (Debian mounts ``/run``
    noexec). The file is created with ``umask 077`` under ``set -C`` (``O_EXCL``:
    a file or link a guest user planted under that name in a world-writable
    directory is never written through), then made executable. Only ``printf``
    (a shell builtin), ``chmod`` and the program run, and the program deletes
    itself; ``rm`` runs only when the program could not.
    """
    program = reseed_program(secrets.token_bytes(32), time.time_ns() if set_clock else None)
    octal = "".join(f"\\{byte:03o}" for byte in program)
    return (f"p='{octal}'; umask 077; set -C; "
            "for d in /run /dev/shm /tmp; do f=$d/qemukit-reseed.$$; "
            'printf "$p" 2>/dev/null > "$f" && chmod 700 "$f" || continue; '
            '"$f" 2>/dev/null; s=$?; [ $s -eq 0 ] && exit 0; rm -f "$f"; [ $s -eq 126 ] || exit $s; '
            "done; exit 5")
