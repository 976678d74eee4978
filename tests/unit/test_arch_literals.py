"""``ARCHES`` (qemukit/arch.py) is the only place that knows what is special about an
architecture: no other module of the library names one in a string literal.

A rule of the form ``arch == "x86_64"`` or a per-architecture table outside the
table drifts when an architecture is added; each such rule is a field of
:class:`qemukit.arch.ArchInfo` instead, and the code reads the field. The scan
looks at string constants that are exactly an architecture's name (so prose in a
docstring or a message, which names architectures for the reader, is not a rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

from qemukit.arch import ARCHES

PACKAGE = Path(__file__).resolve().parents[2] / "qemukit"

#: The architecture module(s): where the names belong.
ARCH_MODULES = {"arch.py"}

#: (path under qemukit/, name) -> why the literal stays.
ALLOWED: dict[tuple[str, str], str] = {
    ("host/_fsguard.py", "x86_64"): "the host kernel's system-call ABI (syscall numbers, "
    "AUDIT_ARCH, x32) keyed by the host's platform.machine(): a table of the kernel's, "
    "not a rule about guests",
    ("host/_fsguard.py", "aarch64"): "as for x86_64: the host kernel's system-call table",
}


def _literals() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ARCH_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ARCHES:
                found.setdefault((rel, str(node.value)), []).append(node.lineno)
    return found


def test_no_architecture_name_literal_outside_the_arch_table() -> None:
    offenders = {f"{rel}:{lines} {name!r}" for (rel, name), lines in _literals().items()
                 if (rel, name) not in ALLOWED}
    assert offenders == set(), ("name the rule as an ArchInfo field in qemukit/arch.py and "
                                "read it, or allow-list the literal with its reason")


def test_the_allow_list_has_no_stale_entries() -> None:
    assert set(ALLOWED) <= set(_literals())
