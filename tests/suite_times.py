"""Where the suite's time went, printed at the end of every run.

``scripts/test`` passes its own phases (``QEMUKIT_TEST_PHASES="setup=12 lint=40"``, seconds);
this plugin adds the time spent setting up shared fixtures (image and kernel builds, the
module VMs that several tests share) and the time in the tests themselves, so a change that
makes the suite slower shows where. pytest's ``--durations`` lists the slowest tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Any

import pytest

_shared: dict[str, float] = {}
_started = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, None]:
    """Time the set-up of every fixture shared beyond one test (session, module, class)."""
    start = time.monotonic()
    yield
    if fixturedef.scope != "function":
        where = request.node.nodeid.split("::")[0] if fixturedef.scope != "session" else "session"
        key = f"{fixturedef.argname} ({where})"
        _shared[key] = _shared.get(key, 0.0) + time.monotonic() - start


def _phases() -> list[tuple[str, float]]:
    found = []
    for part in os.environ.get("QEMUKIT_TEST_PHASES", "").split():
        name, _, value = part.partition("=")
        try:
            found.append((name, float(value)))
        except ValueError:
            continue
    return found


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One block: scripts/test's phases, shared fixtures (the largest first), the tests."""
    total = time.monotonic() - _started
    if "QEMUKIT_TEST_PHASES" not in os.environ and total < 60:
        return  # a quick run by hand: pytest's own summary says enough
    shared = sum(_shared.values())
    write = terminalreporter.write_line
    terminalreporter.section("where the time went")
    for name, seconds in _phases():
        write(f"{name:<28} {seconds:8.1f} s")
    write(f"{'shared fixtures':<28} {shared:8.1f} s   (image and kernel builds, shared VM boots)")
    for key, seconds in sorted(_shared.items(), key=lambda kv: -kv[1])[:8]:
        if seconds >= 1.0:
            write(f"    {seconds:8.1f} s  {key}")
    write(f"{'tests':<28} {total - shared:8.1f} s   (collection included)")
    overall = total + sum(seconds for _, seconds in _phases())
    write(f"{'total':<28} {overall:8.1f} s   ({overall / 60:.1f} min)")
