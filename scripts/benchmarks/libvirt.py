"""Optional (``--with-libvirt``): ``virsh create`` to guest init against qemukit's ``VM.start()``.

Both boot the tiny image's kernel and initramfs with the same command line and
the same devices (q35, TCG, 1 vCPU, 512 MiB, SeaBIOS, 4 PCIe root ports,
virtio-serial with the agent's port, a serial console) and the same QEMU
binary: the domain's ``<emulator>`` is the one qemukit found
(``$QEMUKIT_QEMU`` or qemu-system-x86_64 on PATH), and the part records the
emulator libvirt reports for its domain. Also: libvirtd's RSS and the cost of
one ``virsh`` call. Needs virsh and libvirtd; started as root.
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import psutil

from qemukit import VM, images

from .common import Result, interleave, qemu_binary, summary, tiny_spec, wait_console

LIBVIRT_INSTALL = (
    "apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-clients "
    "(libvirt-daemon-system creates the libvirt-qemu user and qemu.conf the QEMU driver "
    "needs: with only libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients the "
    "driver fails with \"Failed to parse user 'libvirt-qemu'\")"
)
SYSTEM_LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
SYSTEM_VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def _wait_socket(path: Path, deadline: float) -> bool:
    """Until ``deadline``: wait for a unix socket at ``path`` that accepts a connection."""
    while time.monotonic() < deadline:
        if _socket_alive(path):
            return True
        time.sleep(0.05)
    return False


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _stop_daemon(proc: psutil.Process, timeout: float = 15.0) -> None:
    """SIGTERM a daemon we started, SIGKILL it after ``timeout``.

    Daemons are not our children (they double-fork); a zombie awaiting PID 1 counts as gone.
    """

    def gone() -> bool:
        try:
            return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    for sig, wait in ((15, timeout), (9, 5.0)):
        if gone():
            return
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not gone():
            time.sleep(0.05)


def _mib(rss: int) -> float:
    return round(rss / 1024 / 1024, 1)


class _Libvirt:
    """A libvirtd to measure against: the system one if it runs, else a private one.

    How the private daemon is started (as root; nothing in /etc is changed):

    * ``libvirtd --daemon -f DIR/libvirtd.conf -p DIR/libvirtd.pid`` where the config
      sets ``unix_sock_dir = DIR`` (a fresh temporary directory; no TCP, ``--listen`` is
      not given) and ``log_outputs`` to a file in DIR. virsh reaches it with
      ``-c qemu:///system?socket=DIR/libvirt-sock``. Its state lives where any system
      libvirtd's does (/run/libvirt, /var/lib/libvirt, /var/cache/libvirt): a root
      libvirtd is always the privileged ("system") instance, XDG_RUNTIME_DIR only moves
      an unprivileged session daemon.
    * The QEMU driver hands the guest's stdio to virtlogd (qemu.conf's default
      ``stdio_handler = "logd"``) at the fixed path /run/libvirt/virtlogd-sock; a root
      libvirtd does not spawn it. If nothing answers there, ``virtlogd --daemon
      -f DIR/virtlogd.conf -p DIR/virtlogd.pid`` is started too.
    * If /dev/kvm exists but the QEMU user (qemu.conf's ``user``, libvirt-qemu) cannot
      open it (hosts without udev leave it root-only 0600), libvirt probes QEMU with KVM
      as root, then finds KVM "not available now" for that user and throws its
      capability cache away on every API call ("KVM was enabled when probing ..., but it
      is not available now"): every virsh call re-probes QEMU for ~4 s. So libvirtd then
      runs under ``unshare --mount --propagation private`` with a node of the same
      device bind-mounted over /dev/kvm in its own mount namespace, with the
      permissions Debian's udev gives it (root:kvm 0660), as on a normal Debian host.
      The guests still run under TCG (``<domain type='qemu'>``).

    ``close()`` destroys every domain this run created, then SIGTERMs (after 15 s
    SIGKILLs) exactly the daemons whose pids it read from its own pid files, and
    removes DIR and the per-domain logs libvirt wrote (/var/log/libvirt/qemu/NAME.log).
    A system libvirtd that was already running is used and left running.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qk-bench-libvirt-"))
        self.dir.chmod(0o755)  # the QEMU user (libvirt-qemu) must reach the kernel copy
        self.started: dict[str, psutil.Process] = {}  # the daemons we started, by name
        self.uri = "qemu:///system"
        self.daemon: psutil.Process | None = None  # the libvirtd measured
        self.notes: list[str] = []
        self.domains: list[str] = []

    def virsh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS``; raise RuntimeError with its stderr if it fails."""
        out = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                             text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
        return out

    def start(self) -> None:
        """Use the running system libvirtd, or start a private one (and virtlogd if needed)."""
        if _socket_alive(SYSTEM_LIBVIRT_SOCK):
            self.notes.append("used the libvirtd already running (system socket)")
            pidfile = Path("/run/libvirtd.pid")
            if pidfile.exists():
                self.daemon = psutil.Process(int(pidfile.read_text()))
            self.virsh("version")
            return
        if self._needs_virtlogd() and not _socket_alive(SYSTEM_VIRTLOGD_SOCK):
            conf = self.dir / "virtlogd.conf"
            conf.write_text(f'log_outputs = "3:file:{self.dir}/virtlogd.log"\n')
            self._daemon("virtlogd", ["virtlogd", "--daemon", "-f", str(conf),
                                      "-p", str(self.dir / "virtlogd.pid")])
            if not _wait_socket(SYSTEM_VIRTLOGD_SOCK, time.monotonic() + 15):
                raise RuntimeError("virtlogd did not open /run/libvirt/virtlogd-sock")
        conf = self.dir / "libvirtd.conf"
        conf.write_text(f'unix_sock_dir = "{self.dir}"\n'
                        f'log_outputs = "3:file:{self.dir}/libvirtd.log"\n')
        argv = ["libvirtd", "--daemon", "-f", str(conf), "-p", str(self.dir / "libvirtd.pid")]
        node = self._kvm_node()
        if node is not None:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$0" /dev/kvm && exec "$@"', str(node), *argv]
            self.notes.append("/dev/kvm is not usable by the QEMU user here: libvirtd runs "
                              "in its own mount namespace with a root:kvm 0660 /dev/kvm node")
        self.daemon = self._daemon("libvirtd", argv)
        self.uri = f"qemu:///system?socket={self.dir}/libvirt-sock"
        if not _wait_socket(self.dir / "libvirt-sock", time.monotonic() + 60):
            raise RuntimeError(f"libvirtd did not open its socket: {self.log_tail()}")
        self.virsh("version", timeout=120)  # the first call may probe QEMU's capabilities
        self.notes.append(f"started a private libvirtd: {shlex.join(argv)}")

    def _daemon(self, name: str, argv: list[str]) -> psutil.Process:
        pidfile = Path(argv[argv.index("-p") + 1])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pidfile.exists():
            raise RuntimeError(f"{name} did not start (exit {out.returncode}): "
                               f"{out.stderr.strip()} {self.log_tail()}")
        text = ""
        while not text.isdigit() and time.monotonic() < deadline:
            text = pidfile.read_text().strip()  # created before the pid is written
            time.sleep(0.02)
        if not text.isdigit():
            raise RuntimeError(f"{name} wrote no pid to {pidfile} within 30 s")
        proc = psutil.Process(int(text))
        self.started[name] = proc
        return proc

    @staticmethod
    def _needs_virtlogd() -> bool:
        try:
            text = Path("/etc/libvirt/qemu.conf").read_text()
        except OSError:
            return True
        return not any(line.replace(" ", "") == 'stdio_handler="file"'
                       for line in text.splitlines())

    def _kvm_node(self) -> Path | None:
        """A /dev/kvm stand-in with udev's permissions, if the QEMU user cannot use /dev/kvm."""
        try:
            st = os.stat("/dev/kvm")
            user = pwd.getpwnam(self._qemu_user())
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except (OSError, KeyError):
            return None
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
        mode = st.st_mode
        if (mode & 0o006 == 0o006 or (st.st_uid == user.pw_uid and mode & 0o600 == 0o600)
                or (st.st_gid in groups and mode & 0o060 == 0o060)):
            return None  # usable as it is
        node = self.dir / "kvm"
        os.mknod(node, stat.S_IFCHR | 0o660, st.st_rdev)
        os.chown(node, 0, kvm_gid)
        node.chmod(0o660)  # mknod applied the umask
        return node

    @staticmethod
    def _qemu_user() -> str:
        try:
            for line in Path("/etc/libvirt/qemu.conf").read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "user":
                    return value.strip().strip('"')
        except OSError:
            pass
        return "libvirt-qemu"

    def log_tail(self) -> str:
        """The last lines of the private libvirtd's log, for error messages."""
        try:
            return " | ".join((self.dir / "libvirtd.log").read_text().splitlines()[-3:])
        except OSError:
            return ""

    def close(self) -> None:
        """Destroy our domains, stop the daemons we started, remove our files."""
        try:
            if self.domains:
                running = subprocess.run(["virsh", "-q", "-c", self.uri, "list", "--all",
                                          "--name"], capture_output=True, text=True,
                                         timeout=30, check=False).stdout.split()
                for name in set(running) & set(self.domains):
                    subprocess.run(["virsh", "-q", "-c", self.uri, "destroy", name],
                                   capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            for name in ("libvirtd", "virtlogd"):  # libvirtd first: it holds virtlogd
                if name in self.started:
                    _stop_daemon(self.started[name])
            for name in self.domains:
                Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
            shutil.rmtree(self.dir, ignore_errors=True)


def domain_xml(name: str, emulator: str, kernel: Path, initrd: Path, append: str,
               console: Path, memory_mib: int) -> str:
    """A transient domain with the devices qemukit's tiny VM has, run by ``emulator``."""
    # 4 hotplug root ports, a virtio-serial port for the agent (named as qemukit's; here
    # a pty nobody reads).
    ports = "\n    ".join(["<controller type='pci' index='0' model='pcie-root'/>"]
                          + [f"<controller type='pci' index='{i}' model='pcie-root-port'/>"
                             for i in range(1, 5)])
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(append)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <controller type='usb' model='none'/>
    {ports}
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0' bus='0' slot='0x05' function='0'/>
    </controller>
    <channel type='pty'><target type='virtio' name='org.qemukit.agent'/></channel>
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def bench_libvirt(runs: int) -> Result:
    """`virsh create` of a transient domain to guest init, against qemukit's VM.start().

    Both are timed from the call (`virsh create` / `VM(spec).start()`) until
    ``qemukit-init: ready`` appears in the guest's serial console log file, which the
    same 5 ms poll loop watches for both (qemukit's wait_ready() would return on the
    agent's answer, just before that line; it is not used so that both sides are timed
    by the same method). The libvirtd measured is described in :class:`_Libvirt` (the
    system one if it runs, else a private one started and stopped here).
    """
    if not (shutil.which("virsh") and shutil.which("libvirtd")):
        return {"skipped": f"virsh/libvirtd not installed: {LIBVIRT_INSTALL}"}
    image = images.build("tiny")
    spec = tiny_spec()
    emulator = qemu_binary()
    lv = _Libvirt()
    counter = itertools.count()
    used: dict[str, str] = {"found": emulator}
    try:
        lv.start()
        idle_rss = lv.daemon.memory_info().rss if lv.daemon is not None else None
        guest = lv.dir / "guest"
        guest.mkdir(mode=0o755)
        guest.chmod(0o755)
        # Copies: libvirt chowns kernel and initrd to the QEMU user while a domain runs,
        # and that user cannot reach the image cache in root's home.
        kernel, initrd = guest / "vmlinuz", guest / "initrd.img"
        shutil.copyfile(image.kernel, kernel)
        shutil.copyfile(image.initrd, initrd)
        kernel.chmod(0o644)
        initrd.chmod(0o644)
        create_returned: list[float] = []
        start_returned: list[float] = []

        def libvirt_create() -> float:
            n = next(counter)
            name = f"qkbench-{os.getpid()}-{n}"
            console = guest / f"console-{n}.log"
            xml = guest / f"{name}.xml"
            xml.write_text(domain_xml(name, emulator, kernel, initrd, spec.append or "",
                                      console, spec.memory))
            lv.domains.append(name)
            t0 = time.perf_counter()
            try:
                lv.virsh("create", str(xml))
                create_returned.append(time.perf_counter() - t0)
                wait_console(console, time.monotonic() + 60)
                elapsed = time.perf_counter() - t0
                if "libvirt" not in used:  # what libvirt says it runs, once
                    found = ElementTree.fromstring(lv.virsh("dumpxml", name).stdout)
                    used["libvirt"] = found.findtext("devices/emulator") or "?"
                return elapsed
            finally:
                subprocess.run(["virsh", "-q", "-c", lv.uri, "destroy", name],
                               capture_output=True, timeout=60, check=False)
                console.unlink(missing_ok=True)
                xml.unlink(missing_ok=True)

        def qemukit_start() -> float:
            vm = VM(spec)
            t0 = time.perf_counter()
            vm.start()
            try:
                start_returned.append(time.perf_counter() - t0)
                used["qemukit"] = vm.argv[0]
                assert vm.console_log is not None
                wait_console(vm.console_log, time.monotonic() + 60)
                return time.perf_counter() - t0
            finally:
                vm.kill()

        libvirt_create(), qemukit_start()  # warm up: page cache, libvirt's capabilities
        del create_returned[:], start_returned[:]
        res = interleave(runs, virsh_create_to_init=libvirt_create,
                         qemukit_start_to_init=qemukit_start)

        def virsh_version() -> float:
            t0 = time.perf_counter()
            lv.virsh("version")
            return time.perf_counter() - t0

        overhead = summary(interleave(runs, v=virsh_version)["v"])
        lv_rss = lv.daemon.memory_info().rss if lv.daemon is not None else None
        logd = lv.started.get("virtlogd")
        lv_out = summary(res["virsh_create_to_init"])
        qk_out = summary(res["qemukit_start_to_init"])
        return {
            "virsh_create_to_init": lv_out,
            "qemukit_start_to_init": qk_out,
            "ratio_libvirt_vs_qemukit": round(lv_out["median"] / qk_out["median"], 3),
            "virsh_create_returned": summary(create_returned),
            "qemukit_start_returned": summary(start_returned),
            "virsh_version_call": overhead,
            "libvirtd_rss_mib": _mib(lv_rss) if lv_rss is not None else None,
            "libvirtd_rss_mib_before_first_domain": _mib(idle_rss) if idle_rss else None,
            "virtlogd_rss_mib": _mib(logd.memory_info().rss) if logd is not None else None,
            "qemukit_resident_daemon_rss_mib": 0,
            "timed_until": "'qemukit-init: ready' in the serial console log (both sides)",
            "append": spec.append,
            "libvirt": subprocess.run(["libvirtd", "--version"], capture_output=True,
                                      text=True, timeout=30).stdout.strip(),
            "notes": lv.notes,
            "qemu_binary": used,
        }
    except (RuntimeError, OSError, TimeoutError, subprocess.TimeoutExpired,
            psutil.Error, ElementTree.ParseError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "daemon_log": lv.log_tail(),
                "notes": lv.notes}
    finally:
        lv.close()
