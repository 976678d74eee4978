"""The console classifier on real kernel output, and the watcher's verdicts on a real socket."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import tempfile
from pathlib import Path

import pytest

from qemukit._wire.console import (
    REPORT_LINES,
    ConsoleEvent,
    ConsoleWatcher,
    classify,
    classify_text,
    first_fatal,
    share_error,
)
from qemukit.errors import ShareMountError
from qemukit.spec import Share

SAMPLES = Path(__file__).parent / "console_samples"


def sample(name: str) -> str:
    return (SAMPLES / name).read_bytes().decode("utf-8", "replace")


def kinds(text: str) -> list[tuple[str, str]]:
    return [(e.kind, e.line) for e in classify_text(text)]


# -- real output of Debian's 6.1 kernel (see console_samples/README.md) -----------------------


def test_null_pointer_oops() -> None:
    assert kinds(sample("oops-null-pointer.txt")) == [
        ("oops", "BUG: kernel NULL pointer dereference, address: 0000000000000000"),
        ("oops", "Oops: 0002 [#1] PREEMPT SMP NOPTI"),
    ]


def test_bug_on_is_an_oops() -> None:
    # Not matched at all by the old pattern: a BUG_ON went unnoticed.
    assert kinds(sample("oops-bug-on.txt")) == [
        ("oops", "kernel BUG at /tmp/vd/mod/oopsmod.c:12!"),
        ("oops", "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"),
    ]


def test_general_protection_fault_is_an_oops() -> None:
    assert kinds(sample("oops-general-protection.txt")) == [
        ("oops", "general protection fault, maybe for address 0x3: 0000 [#1] PREEMPT SMP NOPTI"),
    ]


def test_soft_lockup_is_a_warning_and_a_verbose_boot_is_clean() -> None:
    assert kinds(sample("soft-lockup-verbose-boot.txt")) == [
        ("warning", "watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [insmod:222]"),
    ]


def test_rcu_stalls_are_warnings() -> None:
    assert kinds(sample("rcu-stall-and-soft-lockup.txt")) == [
        ("warning", "rcu: INFO: rcu_preempt self-detected stall on CPU"),
        ("warning", "watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [insmod:231]"),
        ("warning", "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"),
    ]


def test_warn_is_a_warning() -> None:
    line = "WARNING: CPU: 0 PID: 222 at /tmp/vd/mod/oopsmod.c:11 oopsmod_init+0x1d/0x1000 [oopsmod]"
    assert kinds(sample("warning-verbose-boot.txt")) == [("warning", line), ("warning", line)]


@pytest.mark.parametrize(("name", "line"), [
    ("panic-sysrq.txt", "Kernel panic - not syncing: sysrq triggered crash"),
    ("panic-no-root.txt",
     "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"),
])
def test_panics(name: str, line: str) -> None:
    events = classify_text(sample(name))
    assert [(e.kind, e.line) for e in events] == [("panic", line)]


def test_first_fatal_prefers_a_panic_and_honours_continue() -> None:
    oops = classify_text(sample("oops-null-pointer.txt"))
    panic = classify_text(sample("panic-sysrq.txt"))
    warnings = classify_text(sample("rcu-stall-and-soft-lockup.txt"))
    assert first_fatal(warnings, continue_on_oops=False) is None
    assert first_fatal(oops + warnings, continue_on_oops=False) == oops[0]
    assert first_fatal(oops + warnings, continue_on_oops=True) is None
    assert first_fatal(oops + panic, continue_on_oops=False) == panic[0]


# -- formats of other architectures and reports, as the kernel sources print them --------------


@pytest.mark.parametrize(("line", "kind"), [
    # arch/arm64/kernel/traps.c __die(), arch/arm64/mm/fault.c die_kernel_fault()
    ("[   12.3] Internal error: Oops: 0000000096000005 [#1] PREEMPT SMP", "oops"),
    ("[   12.3] Internal error: Oops - BUG: 00000000f2000800 [#1] SMP", "oops"),
    ("[   12.3] Unable to handle kernel NULL pointer dereference at virtual address "
     "0000000000000000", "oops"),
    ("[   12.3] Unable to handle kernel paging request at virtual address dead000000000108",
     "oops"),
    # arch/riscv/kernel/traps.c die(): "%s [#%d]"
    ("[    1.9] Oops [#1]", "oops"),
    # arch/s390/kernel/dumpstack.c die(): "%s: %04x ilc:%d [#%d] "
    ("[    1.9] Oops: 0004 ilc:3 [#1] SMP", "oops"),
    # arch/powerpc/kernel/traps.c __die(), mm/fault.c
    ("[    1.9] Oops: Kernel access of bad area, sig: 11 [#1]", "oops"),
    ("[    1.9] BUG: Unable to handle kernel data access on read at 0x00000000", "oops"),
    # x86 since 6.9: "Oops: " in front of the die string
    ("[    1.9] Oops: general protection fault, probably for non-canonical address "
     "0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
    ("[    1.9] BUG: unable to handle page fault for address: ffffffffc0569000", "oops"),
    # kernel/sched/core.c, mm/kasan/report.c: BUG reports after which the kernel runs on
    ("[    1.9] BUG: scheduling while atomic: swapper/0/0/0x00000002", "oops"),
    ("[    1.9] BUG: KASAN: slab-use-after-free in foo+0x12/0x30", "oops"),
    # printk's caller id ("[ T123]", "[ C0]") before the message
    ("[  157.401342][    C0] BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 "
     "stuck for 59s!", "warning"),
    # kernel/watchdog_hld.c (pr_fmt "NMI watchdog: ")
    ("[   30.1] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", "warning"),
    # kernel/hung_task.c
    ("[  243.1] INFO: task jbd2/vda1-8:123 blocked for more than 120 seconds.", "warning"),
    # kernel/rcu/tree_stall.h (rcu_sched), tree_exp.h, tasks.h
    ("[   99.0] rcu: INFO: rcu_sched self-detected stall on CPU", "warning"),
    ("[   99.0] rcu: INFO: rcu_sched detected expedited stalls on CPUs/tasks: {", "warning"),
    ("[   99.0] INFO: rcu_tasks detected stalls on tasks:", "warning"),
    # kernel/locking/lockdep.c, lib/ubsan.c
    ("[    5.0] WARNING: possible circular locking dependency detected", "warning"),
    ("[    5.0] UBSAN: shift-out-of-bounds in lib/foo.c:12:3", "warning"),
    ("[    5.0] Kernel panic - not syncing: Fatal exception in interrupt", "panic"),
    ("[    5.0] ---[ end Kernel panic - not syncing: Fatal exception ]---", "panic"),
])
def test_formats(line: str, kind: str) -> None:
    event = classify(line)
    assert event is not None and event.kind == kind, event
    # printk's timestamp and caller id are dropped, the message is kept whole.
    assert event.line == re.sub(r"^\[[^\]]*\](?:\[[^\]]*\])? ", "", line)


@pytest.mark.parametrize("line", [
    "qemukit-init: ready",
    "tiny:/# \x1b[6n",
    "[    0.000000] NX (Execute Disable) protection: active",
    "[    2.2] oopsmod: loading out-of-tree module taints kernel.",
    "[    3.2] ---[ end trace 0000000000000000 ]---",
    "[    1.0] Run /init as init process",
    "oops, a program wrote this",
])
def test_ordinary_lines(line: str) -> None:
    assert classify(line) is None


def test_line_is_cleaned_of_prompt_and_escapes() -> None:
    event = classify("tiny:/# \x1b[6n[    2.721233] BUG: kernel NULL pointer dereference, "
                     "address: 0000000000000000\r")
    assert event == ConsoleEvent(
        "oops", "BUG: kernel NULL pointer dereference, address: 0000000000000000")


# -- share errors -------------------------------------------------------------------------------

NINEP_MISSING = (
    "qemukit-init: share-error tag=share0 path=/mnt/x "
    "virtiofs=[mount: mounting share0 on /mnt/x failed: Invalid argument] "
    "9p=[mount: mounting share0 on /mnt/x failed: No such device] filesystems=[fuse virtiofs]"
)


def test_share_error_for_a_kernel_without_9p() -> None:
    event = classify(NINEP_MISSING)
    assert event is not None and event.kind == "share"
    assert event.fields["tag"] == "share0" and event.fields["path"] == "/mnt/x"
    error = share_error(event, [Share("/srv/data", "/mnt/x", transport="9p")])
    assert isinstance(error, ShareMountError)
    assert (error.tag, error.guest_path, error.transport) == ("share0", "/mnt/x", "9p")
    assert error.reason == "No such device" and error.host_path == "/srv/data"
    text = str(error)
    assert "CONFIG_9P_FS" in text and "CONFIG_NET_9P_VIRTIO" in text
    assert "'share0'" in text and "/mnt/x" in text and "drop ',9p'" in text


def test_share_error_for_a_kernel_without_virtiofs() -> None:
    line = ("qemukit-init: share-error tag=data path=/work virtiofs=[mount: mounting data on "
            "/work failed: No such device] 9p=[mount: mounting data on /work failed: No such "
            "file or directory] filesystems=[9p]")
    event = classify(line)
    assert event is not None
    error = share_error(event, [Share("/h", "/work", tag="data")])
    assert error.transport == "virtiofs" and error.reason == "No such device"
    assert "CONFIG_VIRTIO_FS" in str(error) and "add ',9p'" in str(error)


# -- the watcher on a real socket ---------------------------------------------------------------


class FakeConsole:
    """A listening unix socket standing in for QEMU's console chardev."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="qk-console-")
        self.path = Path(self.dir) / "console.sock"
        self.log = Path(self.dir) / "console.log"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        self.peer: socket.socket | None = None

    def accept(self) -> None:
        self.peer, _ = self.server.accept()

    def send(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.sendall(data)

    def close(self) -> None:
        for s in (self.peer, self.server):
            if s is not None:
                s.close()
        for p in (self.path, self.log):
            p.unlink(missing_ok=True)
        os.rmdir(self.dir)


async def watch(console: FakeConsole, **kw: bool) -> ConsoleWatcher:
    watcher = ConsoleWatcher(console.log, **kw)
    await asyncio.gather(watcher.start(console.path), asyncio.to_thread(console.accept))
    return watcher


def test_watcher_verdicts() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            console.send(sample("rcu-stall-and-soft-lockup.txt").encode())
            await watcher.settle()
            assert not watcher.fatal.done()  # warnings end nothing
            assert len(watcher.warnings) == 3
            console.send(sample("oops-null-pointer.txt").encode())
            event = await asyncio.wait_for(watcher.fatal, 10)
            assert event.kind == "oops" and event.line.startswith("BUG: kernel NULL pointer")
            assert watcher.panic is watcher.fatal
            # Its report ended without a panic: the verdict stays an oops.
            assert await watcher.oops_outcome(event, timeout=5) == event
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_the_end_of_a_panic_report_is_seen() -> None:
    """panic=0 (a dump on panic): the kernel stays put and ends its report with its end
    line, which is what the panic's verdict waits for (QEMU does not exit then)."""
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            console.send(sample("panic-sysrq.txt").encode())
            await watcher.settle()
            assert watcher.fatal.done() and not watcher.panic_ended.is_set()
            console.send(b"[    3.771500] ---[ end Kernel panic - not syncing: sysrq triggered "
                         b"crash ]---\n")
            await asyncio.wait_for(watcher.panic_ended.wait(), 10)
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_oops_that_turns_into_a_panic_is_a_panic() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            console.send(b"[ 1.0] BUG: kernel NULL pointer dereference, address: 00\n"
                         b"[ 1.1] Oops: 0002 [#1] PREEMPT SMP NOPTI\n")
            event = await asyncio.wait_for(watcher.fatal, 10)

            async def rest() -> None:
                await asyncio.sleep(0.2)
                console.send(b"[ 1.2] ---[ end trace 0000000000000000 ]---\n"
                             b"[ 1.3] Kernel panic - not syncing: Fatal exception in interrupt\n")

            task = asyncio.ensure_future(rest())
            outcome = await watcher.oops_outcome(event, timeout=10)
            await task
            assert outcome.kind == "panic" and "Fatal exception" in outcome.line
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_continue_on_oops_records_without_ending() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console, continue_on_oops=True)
            console.send(sample("oops-bug-on.txt").encode())
            await watcher.settle()
            assert not watcher.fatal.done()
            assert [e.kind for e in watcher.events] == ["oops", "oops"]
            assert watcher.warnings[0] == "kernel BUG at /tmp/vd/mod/oopsmod.c:12!"
            console.send(sample("panic-sysrq.txt").encode())  # a panic ends it all the same
            event = await asyncio.wait_for(watcher.fatal, 10)
            assert event.kind == "panic"
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_settle_sees_what_was_sent_before_it() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            for i in range(200):  # many small writes, as a UART produces them
                console.send(f"[ {i}.0] line {i}\n".encode())
            console.send(b"[ 9.0] watchdog: BUG: soft lockup - CPU#0 stuck for 21s! [sh:1]\n")
            await watcher.settle()
            assert watcher.warnings == ["watchdog: BUG: soft lockup - CPU#0 stuck for 21s! [sh:1]"]
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_a_failing_sink_does_not_stop_the_draining() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)

            def broken(chunk: bytes) -> None:
                raise RuntimeError("sink broke")

            watcher.sink = broken
            console.send(b"hello\n")
            await watcher.settle()
            assert watcher.sink is None
            console.send(sample("panic-sysrq.txt").encode())
            assert (await asyncio.wait_for(watcher.fatal, 10)).kind == "panic"
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_reset_forgets_fatal_events_and_sees_the_next_one() -> None:
    """A snapshot load puts back a guest from before the oops or panic: both are forgotten."""

    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            console.send(sample("oops-general-protection.txt").encode())
            await asyncio.wait_for(watcher.fatal, 10)
            watcher.reset()
            assert not watcher.fatal.done()
            console.send(sample("panic-sysrq.txt").encode())
            assert (await asyncio.wait_for(watcher.fatal, 10)).kind == "panic"
            watcher.reset()
            assert not watcher.fatal.done()
            assert [e.kind for e in watcher.events if e.kind != "warning"][:1] == ["oops"]
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


# -- the debugging tools' reports (see console_samples/README.md: which are real) -----------------


def reports(name: str) -> list[tuple[str, str | None, str]]:
    return [(e.kind, e.report, e.line) for e in classify_text(sample(name))]


def test_kasan_is_an_oops_with_its_report() -> None:
    (event,) = classify_text(sample("kasan-slab-out-of-bounds.txt"))
    assert (event.kind, event.report) == ("oops", "kasan")
    assert event.line == "BUG: KASAN: slab-out-of-bounds in kmalloc_oob_right+0x9c/0x1c0 [test_mod]"
    # The first lines of the report, timestamps removed, up to the closing rule.
    assert event.lines[:3] == [event.line,
                               "Write of size 1 at addr ffff888104a3b073 by task insmod/231",
                               "CPU: 0 PID: 231 Comm: insmod Tainted: G           O       6.1.0 #1"]
    assert len(event.lines) == REPORT_LINES
    assert first_fatal([event], continue_on_oops=False) is event
    assert first_fatal([event], continue_on_oops=True) is None


def test_kcsan_is_an_oops_and_its_report_ends_at_the_rule() -> None:
    (event,) = classify_text(sample("kcsan-data-race.txt"))
    assert (event.kind, event.report) == ("oops", "kcsan")
    assert event.line == "BUG: KCSAN: data-race in tick_nohz_next_event / tick_sched_do_timer"
    assert event.lines[1] == "write to 0xffffffff82e1b32c of 4 bytes by interrupt on cpu 0:"
    assert "read to 0xffffffff82e1b32c of 4 bytes by task 0 on cpu 1:" in event.lines


def test_ubsan_is_a_warning_with_what_was_out_of_range() -> None:
    (event,) = classify_text(sample("ubsan-array-index.txt"))
    assert (event.kind, event.report) == ("warning", "ubsan")
    assert event.line == "UBSAN: array-index-out-of-bounds in drivers/net/virtio_net.c:3172:29"
    assert event.lines[1] == "index 4 is out of range for type 'virtnet_sq_stats [4]'"
    assert event.lines[-1] == "</TASK>"  # the closing rule ended it
    assert first_fatal([event], continue_on_oops=False) is None


def test_lockdep_reports_are_warnings() -> None:
    assert reports("lockdep-circular-and-recursive.txt") == [
        ("warning", "lockdep", "WARNING: possible circular locking dependency detected"),
        ("warning", "lockdep", "WARNING: possible recursive locking detected"),
    ]
    circular = classify_text(sample("lockdep-circular-and-recursive.txt"))[0]
    assert circular.lines[1:4] == ["6.1.0 #1 Not tainted",
                                   "------------------------------------------------------",
                                   "kswapd0/79 is trying to acquire lock:"]
    # Blank lines are dropped; the next report's opening rule ends this one.
    assert circular.lines[-1] == "__kmalloc+0x56/0x770" and len(circular.lines) == 13


def test_a_real_hung_task_is_a_warning_each_time() -> None:
    got = reports("hung-task-fsfreeze.txt")
    assert [line for _, _, line in got] == [
        f"INFO: task sh:293 blocked for more than {n} seconds." for n in (5, 10, 15, 20)]
    assert {(kind, report) for kind, report, _ in got} == {("warning", "hung_task")}
    first = classify_text(sample("hung-task-fsfreeze.txt"))[0]
    assert first.lines == [
        "INFO: task sh:293 blocked for more than 5 seconds.",
        "Not tainted 6.1.0-57-cloud-amd64 #1 Debian 6.1.192-3",
        '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.']


def test_kmemleak_reports_are_warnings() -> None:
    assert reports("kmemleak.txt") == [
        ("warning", "kmemleak", "kmemleak: unreferenced object 0xffff888103a6c280 (size 64):"),
        ("warning", "kmemleak",
         "kmemleak: 1 new suspected memory leaks (see /sys/kernel/debug/kmemleak)"),
    ]
    # A cat of /sys/kernel/debug/kmemleak to the console has no prefix.
    event = classify("unreferenced object 0xffff88810a4f3e00 (size 32):")
    assert event is not None and event.report == "kmemleak"


@pytest.mark.parametrize(("line", "report", "kind"), [
    # Every lockdep report header of kernel/locking/lockdep.c (6.1), and what other tools print.
    ("WARNING: inconsistent lock state", "lockdep", "warning"),
    ("WARNING: possible irq lock inversion dependency detected", "lockdep", "warning"),
    ("WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected", "lockdep", "warning"),
    ("WARNING: bad unlock balance detected!", "lockdep", "warning"),
    ("WARNING: held lock freed!", "lockdep", "warning"),
    ("WARNING: Nested lock was not taken", "lockdep", "warning"),
    ("WARNING: lock held when returning to user space!", "lockdep", "warning"),
    ("WARNING: suspicious RCU usage", "lockdep", "warning"),
    ("WARNING: kworker/0:1/17 still has locks held!", "lockdep", "warning"),
    ("INFO: trying to register non-static key.", "lockdep", "warning"),
    ("BUG: MAX_LOCKDEP_KEYS too low!", "lockdep", "warning"),
    ("BUG: KASAN: use-after-free in ext4_fill_super+0x1/0x2", "kasan", "oops"),
    ("BUG: KASAN: double-free in kfree+0x1/0x2", "kasan", "oops"),
    ("BUG: KASAN: invalid-access", "kasan", "oops"),
    ("BUG: KCSAN: assert: race in foo+0x1/0x2", "kcsan", "oops"),
    ("UBSAN: shift-out-of-bounds in lib/foo.c:12:3", "ubsan", "warning"),
    ("INFO: task kworker/u4:2:61 blocked for more than 120 seconds.", "hung_task", "warning"),
    # The generic ones keep no tool name.
    ("WARNING: CPU: 0 PID: 1 at kernel/foo.c:1 f+0x1/0x2", None, "warning"),
    ("BUG: kernel NULL pointer dereference, address: 0000000000000000", None, "oops"),
])
def test_report_headers(line: str, report: str | None, kind: str) -> None:
    event = classify(f"[   12.345678] {line}")
    assert event is not None and (event.report, event.kind) == (report, kind)
    assert event.to_dict() == {"kind": kind, "report": report, "line": line, "lines": [line]}


def test_kasan_ends_a_run_and_the_rule_ends_its_report() -> None:
    """KASAN prints no end-trace marker: its closing rule is what the oops's verdict waits
    for, and the event the run ends with carries the report's lines."""
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console)
            console.send(sample("kasan-slab-out-of-bounds.txt").encode())
            event = await asyncio.wait_for(watcher.fatal, 10)
            assert event.report == "kasan"
            assert await watcher.oops_outcome(event, timeout=30) is event
            assert watcher._oops_ended.is_set()
            assert event.lines[1].startswith("Write of size 1 at addr")
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())


def test_warning_reports_do_not_end_a_run_and_continue_on_oops_lets_kasan_pass() -> None:
    async def main() -> None:
        console = FakeConsole()
        try:
            watcher = await watch(console, continue_on_oops=True)
            for name in ("ubsan-array-index.txt", "lockdep-circular-and-recursive.txt",
                         "hung-task-fsfreeze.txt", "kmemleak.txt", "kasan-slab-out-of-bounds.txt",
                         "kcsan-data-race.txt"):
                console.send(sample(name).encode())
            await watcher.settle()
            assert not watcher.fatal.done()
            assert [e.report for e in watcher.events] == [
                "ubsan", "lockdep", "lockdep", *["hung_task"] * 4, "kmemleak", "kmemleak",
                "kasan", "kcsan"]
            assert len(watcher.warnings) == len(watcher.events)
            await watcher.close()
        finally:
            console.close()

    asyncio.run(main())
