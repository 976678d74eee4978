"""The test writer's verbs against a fake VM: parsing, key maps, PNG writing and error paths.

The fake answers guest commands from a script and records QMP commands, so
each error's text and each refusal before anything is sent is checked
without QEMU. What a real guest does is in tests/integration/test_verbs.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

from qemukit import CommandFailed, GuestError, GuestPanic, SpecError, StateError, WaitTimeout
from qemukit._wire.agent import ExecResult
from qemukit.errors import QMPCommandError
from qemukit.vm import _verbs

if TYPE_CHECKING:
    from qemukit._wire.console import ConsoleWatcher

T = TypeVar("T")
Answer = Callable[[str | Sequence[str]], ExecResult]


def result(status: int = 0, out: str = "", err: str = "") -> ExecResult:
    return ExecResult(("sh",), status, out.encode(), err.encode(), 0.01)


class FakeVM:
    """What the verbs use of an AsyncVM: the agent's exec, QMP, the console tail."""

    def __init__(self, answer: Answer | None = None, tmp: Path | None = None) -> None:
        self.name = "fake"
        self.answer = answer or (lambda command: result())
        self.commands: list[str | Sequence[str]] = []
        self.qmp_calls: list[tuple[str, dict[str, Any]]] = []
        self.qmp_answers: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.runtime = SimpleNamespace(path=tmp) if tmp else None
        self.console_log: Path | None = None
        self.has_agent = True
        self.guest = SimpleNamespace(exec=self._exec)

    def console_tail(self, max_lines: int = 30) -> str:
        return "fake console line"

    async def wait_ready(self, timeout: float | None = None) -> float:
        return 1.0

    async def _exec(self, command: str | Sequence[str], timeout: float | None) -> ExecResult:
        self.commands.append(command)
        return self.answer(command)

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0) -> ExecResult:
        return await self._exec(command, timeout)

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None, *,
                  timeout: float = 30.0, **kwargs: Any) -> Any:
        args = dict(arguments or {})
        args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        self.qmp_calls.append((command, args))
        handler = self.qmp_answers.get(command)
        return handler(args) if handler else {}

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError:
            raise WaitTimeout(what, timeout or 0, self.console_tail()) from None


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# -- succeed / fail / wait_until ---------------------------------------------------


def test_succeed_returns_stdout_and_raises_with_the_output() -> None:
    vm: Any = FakeVM(lambda c: result(0, "fine\n"))
    assert run(_verbs.succeed(vm, ["echo", "fine"], 5)) == "fine\n"
    vm = FakeVM(lambda c: result(2, "some out\n", "it broke\n"))
    with pytest.raises(CommandFailed) as failed:
        run(_verbs.succeed(vm, ["ls", "/nope"], 5))
    err = failed.value
    assert (err.command, err.exit_status, err.stdout, err.stderr, err.expected) == (
        ("ls", "/nope"), 2, "some out\n", "it broke\n", "success")
    text = str(err)
    assert text.startswith("guest command ('ls', '/nope') exited with status 2 (expected success)")
    assert "--- stdout ---\nsome out" in text and "--- stderr ---\nit broke" in text
    assert isinstance(err, GuestError)


def test_fail_returns_stdout_and_raises_on_success() -> None:
    vm: Any = FakeVM(lambda c: result(1, "denied\n"))
    assert run(_verbs.fail(vm, "cat /root/x", 5)) == "denied\n"
    vm = FakeVM(lambda c: result(0, "oops it worked\n"))
    with pytest.raises(CommandFailed, match=r"'cat /root/x' exited with status 0 \(expected failure\)"):
        run(_verbs.fail(vm, "cat /root/x", 5))


def test_command_failed_quotes_only_the_tail_of_long_output() -> None:
    err = CommandFailed("x", 1, "a" * 10_000 + "END", "")
    assert err.stdout.endswith("END") and len(err.stdout) == 10_003  # the whole output is kept
    assert "END" in str(err) and len(str(err)) < 2_300


def test_a_command_killed_at_its_deadline_is_a_wait_timeout() -> None:
    # qemukit's agent runs commands under "timeout -s KILL": status 137 at the deadline.
    vm: Any = FakeVM(lambda c: ExecResult(("sh",), 137, b"half done\n", b"", 5.2))
    with pytest.raises(WaitTimeout) as timed_out:
        run(_verbs.succeed(vm, "make -j1", 5))
    assert str(timed_out.value).startswith("timed out after 5s waiting for the guest command "
                                           "'make -j1' to finish")
    assert "half done" in timed_out.value.last
    # Killed early (by itself, by the OOM killer): a failed command, not a timeout.
    vm = FakeVM(lambda c: ExecResult(("sh",), 137, b"", b"", 0.5))
    with pytest.raises(CommandFailed, match="status 137"):
        run(_verbs.succeed(vm, "make -j1", 5))


def test_wait_until_succeeds_retries_until_it_works() -> None:
    answers = iter([result(1), result(1), result(0, "up\n")])
    vm: Any = FakeVM(lambda c: next(answers))
    assert run(_verbs.wait_until(vm, "probe", 30, succeeds=True)) == "up\n"
    assert len(vm.commands) == 3


def test_wait_until_fails_stops_at_the_first_failure() -> None:
    answers = iter([result(0), result(4, "gone\n")])
    vm: Any = FakeVM(lambda c: next(answers))
    assert run(_verbs.wait_until(vm, "probe", 30, succeeds=False)) == "gone\n"


def test_wait_until_times_out_showing_the_last_try() -> None:
    vm: Any = FakeVM(lambda c: result(3, "still starting\n", "connection refused\n"))
    with pytest.raises(WaitTimeout) as timed_out:
        run(_verbs.wait_until(vm, ["curl", "localhost"], 1.5, succeeds=True))
    text = str(timed_out.value)
    assert text.startswith("timed out after 1.5s waiting for the guest command "
                           "['curl', 'localhost'] to succeed")
    assert "--- last try ---\nexit status 3" in text
    assert "stdout: still starting" in text and "stderr: connection refused" in text
    assert "--- console ---\nfake console line" in text
    assert 2 <= len(vm.commands) <= 20  # retried, at a bounded pace


def test_a_try_that_times_out_is_retried_and_reported() -> None:
    def hang(command: str | Sequence[str]) -> ExecResult:
        raise WaitTimeout("the guest command 'x' to finish", 1)

    vm: Any = FakeVM(hang)
    with pytest.raises(WaitTimeout, match="the try itself timed out"):
        run(_verbs.wait_until(vm, "x", 1.2, succeeds=True))
    assert len(vm.commands) >= 2


# -- ports ---------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:10E2 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0F02000A:0016 0202000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: garbage
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0 0
   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 0 0
   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 0 0
"""


def test_listening_sockets_from_proc_net_tcp() -> None:
    sockets = _verbs.listening_sockets(PROC_NET_TCP)
    assert [(s.address, s.port) for s in sockets] == [
        (ipaddress.ip_address(a), p) for a, p in (
            ("127.0.0.1", 4322), ("0.0.0.0", 22), ("::", 8080), ("::1", 8081),
            ("::ffff:127.0.0.1", 8082))]
    assert [str(s) for s in sockets[:4]] == ["127.0.0.1:4322", "0.0.0.0:22", "[::]:8080",
                                             "[::1]:8081"]
    loopback, anywhere, v6_any, v6_loop, mapped = sockets
    assert loopback.accepts(None) and loopback.accepts("127.0.0.1")
    assert not loopback.accepts("10.0.2.15")
    assert anywhere.accepts("10.0.2.15") and v6_any.accepts("127.0.0.1")
    assert v6_loop.accepts("::1") and not v6_loop.accepts("127.0.0.1")
    assert mapped.accepts("127.0.0.1")
    assert mapped.address == ipaddress.ip_address("::ffff:127.0.0.1")


def test_wait_for_open_port_reads_the_guests_proc() -> None:
    answers = iter([result(0, ""), result(0, PROC_NET_TCP)])
    vm: Any = FakeVM(lambda c: next(answers))
    run(_verbs.wait_for_open_port(vm, 22, "10.0.2.15", 30))
    assert vm.commands[-1] == ["cat", "/proc/net/tcp", "/proc/net/tcp6"]


def test_wait_for_open_port_times_out_naming_port_time_and_what_listened() -> None:
    vm: Any = FakeVM(lambda c: result(0, PROC_NET_TCP))
    with pytest.raises(WaitTimeout) as timed_out:
        run(_verbs.wait_for_open_port(vm, 4322, "10.0.2.15", 1))
    text = str(timed_out.value)
    assert text.startswith("timed out after 1s waiting for TCP port 4322 to open in the guest "
                           "(on 10.0.2.15)")
    assert "127.0.0.1:4322" in text and "0.0.0.0:22" in text


@pytest.mark.parametrize(("port", "addr", "field"), [
    (0, None, "port"), (65536, None, "port"), ("80", None, "port"), (True, None, "port"),
    (80, "localhost", "addr"), (80, "10.0.2", "addr"),
])
def test_wait_for_open_port_refuses_bad_input_before_asking_the_guest(
        port: Any, addr: str | None, field: str) -> None:
    vm: Any = FakeVM()
    with pytest.raises(SpecError) as bad:
        run(_verbs.wait_for_open_port(vm, port, addr, 5))
    assert bad.value.field == field
    assert vm.commands == []


# -- systemd units ---------------------------------------------------------------------


def test_wait_for_unit_without_systemd_fails_at_once() -> None:
    vm: Any = FakeVM(lambda c: result(1))
    with pytest.raises(StateError, match="does not run systemd"):
        run(_verbs.wait_for_unit(vm, "nginx.service", 300))
    assert vm.commands == [["test", "-d", "/run/systemd/system"]]


def test_wait_for_unit_waits_for_active() -> None:
    states = iter(["activating", "inactive", "active"])

    def answer(command: str | Sequence[str]) -> ExecResult:
        if list(command)[:2] == ["systemctl", "is-active"]:
            state = next(states)
            return result(0 if state == "active" else 3, state + "\n")
        return result(0)

    vm: Any = FakeVM(answer)
    run(_verbs.wait_for_unit(vm, "nginx.service", 30))
    assert vm.commands[-1] == ["systemctl", "is-active", "--", "nginx.service"]


def test_wait_for_unit_fails_fast_with_the_units_status() -> None:
    def answer(command: str | Sequence[str]) -> ExecResult:
        argv = list(command)
        if argv[:2] == ["systemctl", "is-active"]:
            return result(3, "failed\n")
        if argv[:2] == ["systemctl", "status"]:
            return result(3, "x nginx.service - web\n   Active: failed (Result: exit-code)\n")
        return result(0)

    vm: Any = FakeVM(answer)
    with pytest.raises(GuestError, match=r"(?s)unit 'nginx.service' failed.*Result: exit-code"):
        run(_verbs.wait_for_unit(vm, "nginx.service", 300))


def test_wait_for_unit_times_out_with_the_last_state() -> None:
    def answer(command: str | Sequence[str]) -> ExecResult:
        return result(3, "activating\n") if "is-active" in command else result(0)

    vm: Any = FakeVM(answer)
    with pytest.raises(WaitTimeout, match=r"(?s)unit 'db.service' to be active.*activating"):
        run(_verbs.wait_for_unit(vm, "db.service", 1))


@pytest.mark.parametrize("unit", ["", "--all", "a\nb", 7])
def test_wait_for_unit_refuses_bad_names(unit: Any) -> None:
    vm: Any = FakeVM()
    with pytest.raises(SpecError, match="unit"):
        run(_verbs.wait_for_unit(vm, unit, 5))
    assert vm.commands == []


# -- console ---------------------------------------------------------------------------


class FakeConsole:
    def __init__(self) -> None:
        self.sink: Callable[[bytes], None] | None = None

    async def settle(self) -> None:
        return None


def test_console_text_is_matched_across_chunks_and_the_previous_sink_still_gets_them() -> None:
    seen: list[bytes] = []

    async def scenario() -> str:
        vm: Any = FakeVM()
        console = FakeConsole()
        console.sink = seen.append
        waiting = asyncio.ensure_future(
            _verbs.wait_for_console_text(vm, cast("ConsoleWatcher", console),
                                         r"ready: (\d+) \u00e9", 10, "now"))
        await asyncio.sleep(0)
        assert console.sink is not seen.append
        sink = console.sink
        assert sink is not None
        for chunk in (b"boot\r\nrea", b"dy: 4", b"2 \xc3", b"\xa9\r\nmore"):
            sink(chunk)
        line = await waiting
        assert console.sink == seen.append  # the user's sink is put back
        return line

    assert run(scenario()) == "ready: 42 \u00e9"
    assert b"".join(seen) == b"boot\r\nready: 42 \xc3\xa9\r\nmore"


def test_console_text_is_not_matched_half_way_through_a_line() -> None:
    async def scenario() -> str:
        console = FakeConsole()
        waiting = asyncio.ensure_future(
            _verbs.wait_for_console_text(FakeVM(), console, r"marker-\d+", 10, "now"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert console.sink is not None
        console.sink(b"marker-4")
        await asyncio.sleep(0.05)
        console.sink(b"2\r\n")
        return await waiting

    assert run(scenario()) == "marker-42"


def test_console_text_matches_a_prompt_without_newline() -> None:
    async def scenario() -> str:
        console = FakeConsole()
        waiting = asyncio.ensure_future(
            _verbs.wait_for_console_text(FakeVM(), console, r"login: $", 10, "now"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert console.sink is not None
        console.sink(b"\r\ndebian login: ")
        return await waiting

    assert run(scenario()) == "debian login: "


def test_console_text_since_start_reads_the_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"early line\r\nqemukit-init: ready\r\n")
    vm: Any = FakeVM()
    vm.console_log = log
    line = run(_verbs.wait_for_console_text(vm, FakeConsole(), r"init: ready", 5, "start"))  # type: ignore[arg-type]
    assert line == "qemukit-init: ready"
    with pytest.raises(WaitTimeout, match=r"timed out after 0.5s waiting for console text "
                                          r"matching 'init: ready'"):
        run(_verbs.wait_for_console_text(vm, FakeConsole(), r"init: ready", 0.5, "now"))  # type: ignore[arg-type]


def test_console_text_errors() -> None:
    vm: Any = FakeVM()
    with pytest.raises(SpecError, match="regex"):
        run(_verbs.wait_for_console_text(vm, FakeConsole(), "(", 5, "now"))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="since"):
        run(_verbs.wait_for_console_text(vm, FakeConsole(), "x", 5, "later"))  # type: ignore[arg-type]
    with pytest.raises(StateError, match="no console watcher"):
        run(_verbs.wait_for_console_text(vm, None, "x", 5, "now"))


# -- screenshots -------------------------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    width, height = _verbs.png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * 3
    assert all(raw[y * stride] == 0 for y in range(height))  # filter type None on every row
    return width, height, b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height))


def test_ppm_to_png_keeps_every_pixel() -> None:
    pixels = bytes(range(7, 7 + 4 * 3 * 3))  # 4x3 RGB
    ppm = b"P6\n# made by a test\n4 3\n255\n" + pixels
    width, height, decoded = _decode_png(_verbs.ppm_to_png(ppm))
    assert (width, height, decoded) == (4, 3, pixels)


@pytest.mark.parametrize("bad", [b"P3\n1 1\n255\n0 0 0", b"P6\n2 2\n255\n\x00\x00", b"P6\n1 1\n65535\n"])
def test_ppm_to_png_refuses_what_it_cannot_read(bad: bytes) -> None:
    with pytest.raises(ValueError):
        _verbs.ppm_to_png(bad)


def test_png_size_refuses_non_png() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        _verbs.png_size(b"P6\n1 1\n255\n\x00\x00\x00" + bytes(20))


def _write_dump(vm: FakeVM, data: bytes) -> Callable[[dict[str, Any]], Any]:
    def screendump(args: dict[str, Any]) -> dict[str, Any]:
        if args.get("format") == "png" and vm.qmp_answers.get("_no_png"):
            raise QMPCommandError("screendump", "GenericError",
                                  "Parameter 'format' is unexpected")
        Path(args["filename"]).write_bytes(data)
        return {}

    return screendump


def test_screenshot_without_a_display_is_a_clear_error(tmp_path: Path) -> None:
    vm = FakeVM(tmp=tmp_path)

    def no_console(args: dict[str, Any]) -> Any:
        raise QMPCommandError("screendump", "GenericError",
                              "There is no console to take a screendump from")

    vm.qmp_answers["screendump"] = no_console
    with pytest.raises(StateError, match=r"no display .*-device', 'VGA'"):
        run(_verbs.screenshot(vm, tmp_path / "x.png", 5))  # type: ignore[arg-type]
    assert not (tmp_path / "x.png").exists()
    assert list(tmp_path.iterdir()) == []  # no scratch file left behind


def test_screenshot_falls_back_to_ppm_on_an_older_qemu(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    vm = FakeVM(tmp=runtime)
    vm.qmp_answers["screendump"] = _write_dump(vm, b"P6 2 1 255\n\xff\x00\x00\x00\xff\x00")
    vm.qmp_answers["_no_png"] = lambda a: True
    shot = run(_verbs.screenshot(vm, tmp_path / "s.png", 5))  # type: ignore[arg-type]
    assert _decode_png(shot.read_bytes()) == (2, 1, b"\xff\x00\x00\x00\xff\x00")
    assert [c for c, _ in vm.qmp_calls] == ["screendump", "screendump"]
    assert list(runtime.iterdir()) == []


def test_screenshot_refuses_what_qemu_wrote_if_it_is_not_a_png(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    vm = FakeVM(tmp=runtime)
    vm.qmp_answers["screendump"] = _write_dump(vm, b"not an image at all, really not")
    with pytest.raises(ValueError, match="not a PNG"):
        run(_verbs.screenshot(vm, tmp_path / "s.png", 5))  # type: ignore[arg-type]
    assert not (tmp_path / "s.png").exists()


def test_screenshot_refuses_a_missing_directory(tmp_path: Path) -> None:
    vm = FakeVM(tmp=tmp_path)
    with pytest.raises(SpecError, match="directory does not exist"):
        run(_verbs.screenshot(vm, tmp_path / "no" / "s.png", 5))  # type: ignore[arg-type]
    assert vm.qmp_calls == []


# -- keys ----------------------------------------------------------------------------------


def test_char_keys_use_shift_for_capitals_and_symbols() -> None:
    assert _verbs.char_keys("a") == ["a"]
    assert _verbs.char_keys("Z") == ["shift", "z"]
    assert _verbs.char_keys("7") == ["7"]
    assert _verbs.char_keys("&") == ["shift", "7"]
    assert _verbs.char_keys(" ") == ["spc"]
    assert _verbs.char_keys("\n") == ["ret"]
    assert _verbs.char_keys("~") == ["shift", "grave_accent"]
    assert _verbs.char_keys("/") == ["slash"]


def test_every_printable_ascii_character_can_be_typed_with_real_key_names() -> None:
    for code in range(0x20, 0x7F):
        for key in _verbs.char_keys(chr(code)):
            assert key in _verbs.KEY_NAMES, (chr(code), key)


def test_send_key_sends_one_chord() -> None:
    vm = FakeVM()
    run(_verbs.send_key(vm, ("ctrl-alt-delete",), None))  # type: ignore[arg-type]
    run(_verbs.send_key(vm, ("Shift", "a"), 0.5))  # type: ignore[arg-type]
    assert vm.qmp_calls == [
        ("send-key", {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]}),
        ("send-key", {"keys": [{"type": "qcode", "data": k} for k in ("shift", "a")],
                      "hold-time": 500}),
    ]


@pytest.mark.parametrize(("keys", "hold", "field"), [
    (("ctrl", "nokey"), None, "keys"), ((), None, "keys"), (("a",), 0, "hold_time"),
    (("a",), 120, "hold_time"),
])
def test_send_key_refuses_bad_input_before_sending(keys: tuple[str, ...], hold: float | None,
                                                   field: str) -> None:
    vm = FakeVM()
    with pytest.raises(SpecError) as bad:
        run(_verbs.send_key(vm, keys, hold))  # type: ignore[arg-type]
    assert bad.value.field == field
    assert vm.qmp_calls == []


def test_send_chars_checks_every_character_first() -> None:
    vm = FakeVM()
    with pytest.raises(SpecError, match=re.escape("text='\u00e9'")):
        run(_verbs.send_chars(vm, "ok then caf\u00e9"))  # type: ignore[arg-type]
    assert vm.qmp_calls == []
    run(_verbs.send_chars(vm, "Hi!"))  # type: ignore[arg-type]
    assert [[k["data"] for k in a["keys"]] for _, a in vm.qmp_calls] == [
        ["shift", "h"], ["i"], ["shift", "1"]]


# -- crash and links -----------------------------------------------------------------------


def test_crash_returns_the_panic() -> None:
    def panic(command: str | Sequence[str]) -> ExecResult:
        assert command == "echo c > /proc/sysrq-trigger"
        raise GuestPanic("Kernel panic - not syncing: sysrq triggered crash", "console")

    assert "sysrq" in run(_verbs.crash(FakeVM(panic), 5)).line  # type: ignore[arg-type]


def test_crash_that_does_not_panic_is_an_error() -> None:
    with pytest.raises(GuestError, match="did not panic"):
        run(_verbs.crash(FakeVM(), 5))  # type: ignore[arg-type]
    vm = FakeVM()
    vm.has_agent = False
    with pytest.raises(StateError, match="no guest agent"):
        run(_verbs.crash(vm, 5))  # type: ignore[arg-type]


def _peripherals(vm: FakeVM, nics: Sequence[str], others: Sequence[str] = ("hp0", "vser0")) -> None:
    vm.qmp_answers["qom-list"] = lambda a: [{"name": "type", "type": "string"}] + [
        {"name": n, "type": "child<x>"} for n in (*others, *nics)]

    def qom_get(args: dict[str, Any]) -> str:
        name = args["path"].rsplit("/", 1)[1]
        if name not in nics:
            raise QMPCommandError("qom-get", "GenericError", "Property 'x.netdev' not found")
        return f"{name}-backend"

    vm.qmp_answers["qom-get"] = qom_get


def test_block_and_unblock_every_nic_or_one() -> None:
    vm = FakeVM()
    _peripherals(vm, ["net0", "lan1"])
    assert run(_verbs.block(vm, None, up=False)) == ["net0", "lan1"]  # type: ignore[arg-type]
    assert run(_verbs.block(vm, "lan1", up=True)) == ["lan1"]  # type: ignore[arg-type]
    links = [(a["name"], a["up"]) for c, a in vm.qmp_calls if c == "set_link"]
    assert links == [("net0", False), ("lan1", False), ("lan1", True)]


def test_block_refuses_an_unknown_nic_and_a_vm_without_one() -> None:
    vm = FakeVM()
    _peripherals(vm, ["net0"])
    with pytest.raises(SpecError, match="no such NIC; its NICs: net0"):
        run(_verbs.block(vm, "hp0", up=False))  # type: ignore[arg-type]
    vm = FakeVM()
    _peripherals(vm, [])
    with pytest.raises(StateError, match="no NIC whose link could be cut"):
        run(_verbs.block(vm, None, up=False))  # type: ignore[arg-type]
    assert not [c for c, _ in vm.qmp_calls if c == "set_link"]
