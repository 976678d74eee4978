"""The test writer's verbs against the real tiny guest under TCG, checked from inside it.

One VM (a NIC on user networking, a VGA display, the PS/2 keyboard every q35
machine has) serves every verb but ``crash``, which gets its own. Keys are
checked where they land: the guest's evdev device for the keyboard. Links
are checked by the guest's carrier and by a TCP connection to a listener
on the host (10.0.2.2 under user networking).
"""

from __future__ import annotations

import base64
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, CommandFailed, GuestPanic, Nic, SpecError, StateError, VMSpec, WaitTimeout

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("verbs")]

#: Linux key codes (input-event-codes.h) of the keys the keyboard test types.
KEY_ESC, KEY_1, KEY_I, KEY_H, KEY_ENTER, KEY_LEFTSHIFT = 1, 2, 23, 35, 28, 42


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    """A TCP server on the host's loopback that answers 'hello' (10.0.2.2 from the guest)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"hello\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(5)
    srv.close()


@pytest.fixture(scope="module")
def vm(tiny_image: Any) -> Iterator[VM]:
    from qemukit import images

    spec: VMSpec = images.spec("tiny", accel="tcg").replace(
        nics=(Nic(),), extra_args=("-device", "VGA"))
    with VM(spec) as machine:
        machine.wait_ready(180)
        yield machine


def test_succeed_and_fail(vm: VM) -> None:
    assert vm.succeed("echo out; echo err >&2") == "out\n"
    assert vm.succeed(["echo", "a b"]) == "a b\n"
    assert vm.fail("echo nope; exit 3") == "nope\n"

    with pytest.raises(CommandFailed) as failed:
        vm.succeed("echo partial; echo broken >&2; exit 7")
    assert failed.value.exit_status == 7
    assert failed.value.stdout == "partial\n"
    assert failed.value.stderr == "broken\n"
    assert "status 7" in str(failed.value) and "broken" in str(failed.value)

    with pytest.raises(CommandFailed, match="expected failure") as passed:
        vm.fail(["true"])
    assert passed.value.exit_status == 0 and passed.value.command == ("true",)


def test_a_command_that_outlives_its_timeout_is_a_wait_timeout(vm: VM) -> None:
    with pytest.raises(WaitTimeout, match="(?s)'echo begun; sleep 30' to finish.*begun"):
        vm.succeed("echo begun; sleep 30", timeout=2)
    with pytest.raises(CommandFailed, match="status 137"):  # killed, but not by the deadline
        vm.succeed("kill -9 $$", timeout=30)
    assert vm.succeed("echo still here") == "still here\n"


def test_wait_until_succeeds_and_fails(vm: VM) -> None:
    vm.succeed("rm -f /tmp/flag; (sleep 2; touch /tmp/flag) >/dev/null 2>&1 &")
    assert vm.wait_until_succeeds("test -e /tmp/flag && echo there", timeout=120) == "there\n"
    vm.succeed("(sleep 2; rm /tmp/flag) >/dev/null 2>&1 &")
    vm.wait_until_fails("test -e /tmp/flag", timeout=120)

    began = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        vm.wait_until_succeeds("echo last-words; echo on-stderr >&2; false", timeout=4)
    message = str(timed_out.value)
    assert "timed out after 4s" in message and "to succeed" in message
    assert "exit status 1" in message and "last-words" in message and "on-stderr" in message
    assert timed_out.value.last and "last-words" in timed_out.value.last
    assert time.monotonic() - began < 60  # bounded, whatever the load


def test_wait_for_open_port(vm: VM) -> None:
    # busybox httpd: one on every address, one on loopback only.
    vm.succeed("httpd -p 4321 -h /tmp && httpd -p 127.0.0.1:4322 -h /tmp")
    try:
        vm.wait_for_open_port(4321, timeout=60)
        vm.wait_for_open_port(4321, addr="10.0.2.15", timeout=60)  # the wildcard counts
        vm.wait_for_open_port(4322, addr="127.0.0.1", timeout=60)
        with pytest.raises(WaitTimeout) as elsewhere:
            vm.wait_for_open_port(4322, addr="10.0.2.15", timeout=3)
        assert "127.0.0.1:4322" in str(elsewhere.value)  # what was listening is shown
    finally:
        vm.succeed("pkill -x httpd || killall httpd || true")


def test_wait_for_open_port_times_out_with_a_clear_error(vm: VM) -> None:
    with pytest.raises(WaitTimeout) as timed_out:
        vm.wait_for_open_port(4444, timeout=5)
    message = str(timed_out.value)
    print(f"\n{message}")
    assert message.startswith("timed out after 5s waiting for TCP port 4444 to open in the guest")
    assert timed_out.value.timeout == 5
    with pytest.raises(SpecError, match="port"):
        vm.wait_for_open_port(70000, timeout=5)


def test_wait_for_unit_without_systemd_fails_at_once(vm: VM) -> None:
    began = time.monotonic()
    with pytest.raises(StateError, match="does not run systemd"):
        vm.wait_for_unit("sshd.service", timeout=300)
    assert time.monotonic() - began < 60


def test_wait_for_console_text(vm: VM) -> None:
    vm.succeed("echo qk-before-marker > /dev/console")
    # From the start: already printed. (This also settles the console, so the
    # "now" wait below does not see the line arrive late.)
    assert "qk-before-marker" in vm.wait_for_console_text(r"qk-before-\w+", since="start",
                                                           timeout=60)
    with pytest.raises(WaitTimeout, match="qk-before"):
        vm.wait_for_console_text(r"qk-before-\w+", timeout=3)  # "now": printed earlier
    vm.succeed("(sleep 2; echo qk-later-marker-42 > /dev/console) >/dev/null 2>&1 &")
    line = vm.wait_for_console_text(r"qk-later-marker-(\d+)", timeout=120)
    assert line.strip().endswith("qk-later-marker-42")
    with pytest.raises(SpecError, match="regex"):
        vm.wait_for_console_text("(unclosed", timeout=3)


def _png_pixels(data: bytes) -> tuple[int, int, int]:
    """Width, height and the inflated size of a PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] in (b"\x08\x02", b"\x08\x06"), "8-bit RGB or RGBA"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    assert size is not None
    return size[0], size[1], len(zlib.decompress(idat))


def test_screenshot_is_a_png_of_the_display_size(vm: VM, tmp_path: Path) -> None:
    shot = vm.screenshot(tmp_path / "screen.png")
    assert shot == tmp_path / "screen.png"
    width, height, inflated = _png_pixels(shot.read_bytes())
    # QEMU's own idea of the display's size: its PPM dump of the same surface.
    ppm = tmp_path / "screen.ppm"
    vm.qmp("screendump", filename=str(ppm), format="ppm")
    header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", ppm.read_bytes())
    assert header is not None
    assert (width, height) == (int(header[1]), int(header[2]))
    assert inflated in (height * (1 + width * 3), height * (1 + width * 4))
    print(f"\nscreenshot: {width}x{height}, {shot.stat().st_size} bytes")
    assert (width, height) == (720, 400)  # VGA text mode: 80x25 cells of 9x16


def _key_presses(raw: bytes) -> list[int]:
    """The key codes pressed (EV_KEY, value 1) in a stream of x86_64 ``struct input_event``."""
    presses = []
    for offset in range(0, len(raw) - len(raw) % 24, 24):
        ev_type, code, value = struct.unpack("<HHi", raw[offset + 16:offset + 24])
        if ev_type == 1 and value == 1:
            presses.append(code)
    return presses


def test_send_key_and_send_chars_reach_the_guest_keyboard(vm: VM) -> None:
    devices = vm.succeed("cat /proc/bus/input/devices")
    block = next(b for b in devices.split("\n\n") if "AT Translated Set 2 keyboard" in b)
    event = re.search(r"Handlers=.*\b(event\d+)", block)
    assert event is not None
    vm.succeed(f"rm -f /tmp/keys; sh -c 'echo $$ > /tmp/keys.pid; exec cat /dev/input/{event[1]} "
               f"> /tmp/keys' >/dev/null 2>&1 &")
    # Keys sent before the reader opened the device would be lost: wait until it has.
    vm.wait_until_succeeds(f"ls -l /proc/$(cat /tmp/keys.pid)/fd | grep -q {event[1]}",
                           timeout=60)
    try:
        vm.send_key("esc")
        vm.send_chars("Hi!\n")
        expected = [KEY_ESC, KEY_LEFTSHIFT, KEY_H, KEY_I, KEY_LEFTSHIFT, KEY_1, KEY_ENTER]
        deadline = time.monotonic() + 60
        presses: list[int] = []
        while time.monotonic() < deadline:
            presses = _key_presses(base64.b64decode(vm.succeed("base64 /tmp/keys")))
            if len(presses) >= len(expected):
                break
            time.sleep(0.5)
        assert presses == expected
    finally:
        vm.succeed("kill $(cat /tmp/keys.pid) || true")
    with pytest.raises(SpecError, match="keys"):
        vm.send_key("ctrl", "no_such_key")
    with pytest.raises(SpecError, match="text"):
        vm.send_chars("caf\u00e9")


def test_block_and_unblock_cut_and_restore_the_link(vm: VM, host_listener: int) -> None:
    reach = f"nc -w 5 10.0.2.2 {host_listener}"
    assert vm.wait_until_succeeds(reach, timeout=120) == "hello\n"  # udhcpc may still run
    assert vm.succeed("cat /sys/class/net/eth0/carrier") == "1\n"

    assert vm.block() == ["net0"]
    try:
        vm.wait_until_succeeds("grep -qx 0 /sys/class/net/eth0/carrier", timeout=60)
        assert vm.succeed("cat /sys/class/net/eth0/operstate") == "down\n"
        vm.fail(reach, timeout=30)
    finally:
        assert vm.unblock("net0") == ["net0"]
    vm.wait_until_succeeds("grep -qx 1 /sys/class/net/eth0/carrier", timeout=60)
    assert vm.wait_until_succeeds(reach, timeout=120) == "hello\n"

    with pytest.raises(SpecError, match="no such NIC; its NICs: net0"):
        vm.block("net9")


def test_crash_reports_a_guest_panic(booted: Any, tmp_path: Path) -> None:
    vm = booted()  # no display, no NIC: the errors for those first
    with pytest.raises(StateError, match="no display"):
        vm.screenshot(tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(StateError, match="no NIC"):
        vm.block()

    panic = vm.crash(timeout=120)
    assert isinstance(panic, GuestPanic)
    print(f"\ncrash: {panic.line}")
    assert "sysrq" in panic.line.lower() or "sysrq" in panic.console.lower()
    with pytest.raises(GuestPanic):
        vm.succeed("true")


def test_wait_for_unit_on_a_systemd_guest() -> None:
    """The Debian image (only if already built: building it is another module's cost)."""
    from qemukit import GuestError, images

    if images.find_image("debian") is None:
        pytest.skip("the debian image is not built (qemukit images build debian)")
    with VM(images.spec("debian", accel="tcg")) as debian:
        debian.wait_for_unit("systemd-journald.service", timeout=600)
        debian.wait_for_unit("qemu-guest-agent.service", timeout=300)
        # A transient unit that fails stays "failed": the wait ends at once, with its status.
        debian.succeed(["systemd-run", "--unit=qk-doomed", "--", "sh", "-c", "echo dying; exit 3"])
        began = time.monotonic()
        with pytest.raises(GuestError, match=r"(?s)unit 'qk-doomed.service' failed.*status=3"):
            debian.wait_for_unit("qk-doomed.service", timeout=300)
        assert time.monotonic() - began < 120
        with pytest.raises(WaitTimeout, match="unit 'qk-never.service' to be active"):
            debian.wait_for_unit("qk-never.service", timeout=5)
