"""One results vocabulary: no outcome is spelled as a string outside ``qemukit.results``.

Like tests/unit/test_layers.py this reads the source. Every string constant in
qemukit/ whose value is an outcome's name (``"passed"``, ``"panic"``, ...) is an
offence, unless it is plainly something else:

- the name of a field: a subscript key (``fields["error"]``), the key of
  ``.get("error")``, the one outcome-named key of a dict literal
  (``{"error": str(exc)}``) or a key whose value has its name
  (``{"panic": result.panic}``), the left of ``"error" in message``, or the name in a
  ``("panic", result.panic)`` pair;
- compared with another vocabulary's value: a console event's ``kind``, a unit's
  ``state``, a QEMU job's ``status``;
- a docstring;
- listed in :data:`OTHER_VOCABULARIES` with its reason.

Everything else (``outcome = "passed"``, ``result.outcome == "panic"``, a table
keyed by outcomes, a tuple of them) uses :class:`qemukit.results.Outcome`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qemukit.results import Outcome

PACKAGE = Path(__file__).resolve().parents[2] / "qemukit"
NAMES = {o.value for o in Outcome}
#: Where an outcome's name means something else, by module and value, with the reason.
OTHER_VOCABULARIES: dict[tuple[str, str], str] = {
    ("_wire/console.py", "panic"): "a kind of console event (EventKind), not a verdict",
    ("_wire/console.py", "oops"): "a kind of console event (EventKind), not a verdict",
    ("vm/_state.py", "failed"): "VMState.FAILED, the VM's lifecycle state",
    ("guest.py", "failed"): "a word of an error message",
    ("matrix/_file.py", "timeout"): "a job's key, its timeout in seconds",
}
#: Names compared with these are another vocabulary's values.
OTHER_SUBJECTS = ("kind", "state", "status")


def _name(node: ast.AST) -> str:
    """The last name of an expression: ``e.kind`` -> kind, ``state`` -> state."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _excused(tree: ast.Module) -> set[int]:
    """The ids of the constants that are field names, other vocabularies or docstrings."""
    excused: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                excused.add(id(body[0].value))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            excused.add(id(node.slice))
        elif (isinstance(node, ast.Call) and _name(node.func) in ("get", "pop", "setdefault")
              and node.args and isinstance(node.args[0], ast.Constant)):
            excused.add(id(node.args[0]))
        elif isinstance(node, ast.Dict):
            named = [k for k in node.keys if isinstance(k, ast.Constant) and k.value in NAMES]
            if len(named) == 1:
                excused.add(id(named[0]))
            # {"panic": result.panic, "oops": oops}: fields named after their values
            excused.update(id(k) for k, v in zip(node.keys, node.values, strict=True)
                           if isinstance(k, ast.Constant) and _name(v) == k.value)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if (isinstance(node.ops[0], (ast.In, ast.NotIn)) and isinstance(node.left, ast.Constant)
                    and len(node.comparators) == 1):
                excused.add(id(node.left))
            if any(_name(side) in OTHER_SUBJECTS for side in sides):
                excused.update(id(c) for side in sides for c in ast.walk(side)
                               if isinstance(c, ast.Constant))
        elif (isinstance(node, ast.Tuple) and len(node.elts) == 2
              and isinstance(node.elts[0], ast.Constant) and _name(node.elts[1]) == node.elts[0].value):
            excused.add(id(node.elts[0]))
    return excused


def outcome_literals(path: Path) -> list[str]:
    """``file:line 'value'`` for each outcome name spelled as a string in ``path``."""
    rel = path.relative_to(PACKAGE).as_posix()
    tree = ast.parse(path.read_text())
    excused = _excused(tree)
    return [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in NAMES and id(node) not in excused
            and (rel, node.value) not in OTHER_VOCABULARIES]


def test_no_outcome_is_spelled_outside_the_enum() -> None:
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "results.py"
                 or path.parent != PACKAGE for hit in outcome_literals(path)]
    assert offenders == [], "use qemukit.results.Outcome: " + ", ".join(offenders)


@pytest.mark.parametrize(("code", "found"), [
    ('outcome = "passed" if ok else "failed"\n', 2),
    ('if result.outcome == "panic":\n    pass\n', 1),
    ('sys.exit({"panic": 255, "oops": 254}.get(result.outcome, 0))\n', 2),
    ('ORDER = ("passed", "failed", "error")\n', 3),
    ('fields["error"] = "x"\nreport = {"error": str(exc)}\nif "error" in message:\n    pass\n', 0),
    ('if e.kind == "oops":\n    pass\nprops = [("panic", self.panic)]\n', 0),
    ('line = {"panic": r.panic, "oops": oops, "error": r.error}\n', 0),
])
def test_the_check_sees_outcomes_and_only_outcomes(tmp_path: Path, code: str, found: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", tmp_path)
    (tmp_path / "sample.py").write_text(code)
    assert len(outcome_literals(tmp_path / "sample.py")) == found


def test_one_module_writes_junit_and_cleans_text_for_it() -> None:
    """kernel runs and matrices both write through qemukit.results (it had a copy in each)."""
    writers = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
                     if "xml.etree" in path.read_text() or '"testsuite"' in path.read_text()
                     or "_XML_FORBIDDEN" in path.read_text())
    assert writers == ["results.py"]
