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
