"""The shutdown ladder's agent rung (machines without a power button), with a fake QEMU process."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from qemukit.errors import StateError, WaitTimeout
from qemukit.vm import ShutdownRung
from qemukit.vm._ladder import run_ladder


class FakeQemu:
    """Exits when told to (by the guest's power-off or a signal); waits time out otherwise."""

    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.exited = asyncio.Event()
        self.signals: list[int] = []

    def alive(self) -> bool:
        return self.returncode is None

    def exit(self, status: int) -> None:
        self.returncode = status
        self.exited.set()

    async def wait(self, timeout: float) -> int:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            raise WaitTimeout("QEMU to exit", timeout) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.exit(-sig)


def ladder(proc: FakeQemu, poweroff: Any, acpi_timeout: float = 5.0) -> Any:
    return asyncio.run(run_ladder(proc, None, "vm", acpi_timeout=acpi_timeout,  # type: ignore[arg-type]
                                  quit_timeout=1, term_timeout=1, kill_timeout=1,
                                  agent_poweroff=poweroff))


def test_a_guest_that_powers_off_when_asked_ends_on_the_agent_rung() -> None:
    proc = FakeQemu()

    async def poweroff() -> None:
        asyncio.get_running_loop().call_later(0.2, proc.exit, 0)

    result = ladder(proc, poweroff)
    assert (result.rung, result.tried, result.exit_status) == (
        ShutdownRung.AGENT, (ShutdownRung.AGENT,), 0)
    assert proc.signals == []


def test_an_agent_that_fails_or_a_guest_that_stays_goes_to_the_next_rung() -> None:
    async def refuses() -> None:
        raise StateError("the guest agent could not start a power-off")

    async def ignored() -> None:
        return None

    for poweroff, timeout in ((refuses, 5.0), (ignored, 0.5)):
        proc = FakeQemu()
        result = ladder(proc, poweroff, timeout)
        assert result.rung == ShutdownRung.SIGTERM, result
        assert result.tried == (ShutdownRung.AGENT, ShutdownRung.SIGTERM)
        assert proc.signals == [signal.SIGTERM]
