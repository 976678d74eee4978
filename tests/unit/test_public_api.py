"""The public surface and the layering rules, checked on the source itself."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import qemukit

PACKAGE_DIR = Path(qemukit.__file__).parent
SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
MODULE_NAMES = sorted(
    m.name for m in pkgutil.walk_packages(qemukit.__path__, "qemukit.") if m.name != "qemukit.pytest_plugin"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE_DIR.parent))


def test_sources_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"__init__.py", "spec.py", "argv.py", "errors.py", "cli.py"} <= names


def test_all_names_exist() -> None:
    assert qemukit.__all__
    assert len(set(qemukit.__all__)) == len(qemukit.__all__)
    missing = [n for n in qemukit.__all__ if not hasattr(qemukit, n)]
    assert not missing


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from qemukit import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(qemukit.__all__)


def test_errors_share_one_root() -> None:
    errors = [getattr(qemukit, n) for n in qemukit.__all__
              if n.endswith(("Error", "Panic", "Oops", "Timeout"))]
    assert len(errors) >= 10
    assert {qemukit.GuestOops, qemukit.ShareMountError} <= set(errors)
    assert issubclass(qemukit.GuestOops, qemukit.GuestError)
    assert not issubclass(qemukit.GuestOops, qemukit.GuestPanic)  # an oops is not a panic
    assert issubclass(qemukit.ShareMountError, qemukit.GuestError)
    for cls in errors:
        assert issubclass(cls, qemukit.QemukitError), cls


def test_py_typed_is_shipped() -> None:
    assert (PACKAGE_DIR / "py.typed").exists()


def _own_doc(obj: object) -> str:
    """The docstring written for ``obj`` itself, not one generated or inherited."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # dataclasses make up a signature when there is no docstring
        if issubclass(obj, enum.Enum) and doc in ("An enumeration.", ""):
            return ""
        return doc.strip()
    return (getattr(obj, "__doc__", None) or "").strip()


def _public_members(cls: type) -> list[tuple[str, object]]:
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            members.append((name, value))
    return members


@pytest.mark.parametrize("module_name", ["qemukit", *MODULE_NAMES])
def test_public_names_have_docstrings(module_name: str) -> None:
    module: ModuleType = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"{module_name} has no module docstring"
    undocumented = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants
        if not _own_doc(obj):
            undocumented.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("qemukit"):
            undocumented += [f"{name}.{m}" for m, f in _public_members(obj) if not _own_doc(f)]
    assert not undocumented, f"{module_name}: {undocumented}"


def test_docstring_check_catches_a_dataclass_without_one() -> None:
    @dataclasses.dataclass
    class Bare:
        x: int

    assert _own_doc(Bare) == ""
    assert _own_doc(qemukit.VMSpec)


# -- no shell, ever ------------------------------------------------------------------------

_SHELL_PATTERNS = [
    re.compile(r"shell\s*=\s*True"),
    re.compile(r"\bos\s*\.\s*system\s*\("),
    re.compile(r"\bos\s*\.\s*popen\s*\("),
    re.compile(r"from\s+os\s+import\s+[^\n]*\b(system|popen)\b"),
]


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_shell_in_source_text(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    hits = [p.pattern for p in _SHELL_PATTERNS if p.search(text)]
    assert not hits, f"{_rel(path)}: {hits}"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_shell_in_calls(path: Path) -> None:
    # The AST catches what a text scan could miss: shell=<anything truthy>, aliases of os.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    os_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == "os"
    }
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("system", "popen")
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            bad += [
                f"line {node.lineno}: from os import {a.name}"
                for a in node.names
                if a.name in ("system", "popen")
            ]
    assert not bad, f"{_rel(path)}: {bad}"


def test_shell_scan_would_notice() -> None:
    sample = "import subprocess, os\nsubprocess.run('ls', shell=True)\nos.system('ls')\n"
    assert all(p.search(sample) for p in _SHELL_PATTERNS[:2])


# -- layering: spec and argv stay pure ---------------------------------------------------------

FORBIDDEN_IN_PURE = {"subprocess", "socket", "asyncio"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level external modules, sibling qemukit modules) that ``path`` imports."""
    external: set[str] = set()
    internal: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "qemukit":
                    internal.add(alias.name.split(".")[1] if "." in alias.name else "__init__")
                else:
                    external.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "qemukit":
                    internal.add(parts[1] if len(parts) > 1 else "__init__")
                else:
                    external.add(parts[0])
            elif node.module:
                internal.add(node.module.split(".")[0])
            else:
                internal.update(alias.name for alias in node.names)
    return external, internal


def _closure(module: str) -> dict[str, set[str]]:
    """External imports of ``module`` and every qemukit module it imports, transitively."""
    seen: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = PACKAGE_DIR / f"{name}.py"
        external, internal = _imports(path)
        seen[name] = external
        todo.extend(internal - seen.keys())
    return seen


@pytest.mark.parametrize("module", ["spec", "argv"])
def test_pure_modules_import_no_io(module: str) -> None:
    closure = _closure(module)
    assert module in closure
    bad = {name: ext & FORBIDDEN_IN_PURE for name, ext in closure.items() if ext & FORBIDDEN_IN_PURE}
    assert not bad, f"{module} reaches {bad}"


def test_import_scan_sees_relative_imports() -> None:
    assert "spec" in _closure("argv")
    assert "errors" in _closure("spec")
    assert "subprocess" in set().union(*_closure("host").values())  # via .process


def test_library_does_not_import_click_or_pytest() -> None:
    allowed = {"cli.py", "pytest_plugin.py"}
    bad = []
    for path in SOURCES:
        # The command line lives in cli.py and its cli_*.py parts.
        if path.name in allowed or path.name.startswith("cli_"):
            continue
        external, _ = _imports(path)
        if external & {"click", "pytest"}:
            bad.append(f"{_rel(path)}: {sorted(external & {'click', 'pytest'})}")
    assert not bad


# -- public modules are attributes, loaded lazily ------------------------------------------


def _imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter imports to run ``code`` (from -X importtime)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                          text=True, check=True)
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:")}


def test_import_qemukit_stays_light() -> None:
    imported = _imported_by("import qemukit")
    assert "qemukit" in imported and "qemukit.spec" in imported
    heavy = {"asyncio", "qemu.qmp", "qemukit.vm", "qemukit.images", "psutil", "click"}
    assert not heavy & imported, sorted(heavy & imported)


def _run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter (this one has imported every module already)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", qemukit.SUBMODULES)
def test_public_module_is_an_attribute(name: str) -> None:
    _run_fresh(
        f"import qemukit, sys\n"
        f"assert '{name}' in dir(qemukit)\n"
        f"module = qemukit.{name}\n"
        f"assert module is sys.modules['qemukit.{name}'], module\n"
    )


def test_images_spec_through_the_package() -> None:
    _run_fresh("import qemukit\nassert callable(qemukit.images.spec)\n"
               "assert callable(qemukit.kernel.run_kernel)\n")


def test_submodules_are_the_documented_ones() -> None:
    on_disk = {m.name.rsplit(".", 1)[-1] for m in pkgutil.iter_modules(qemukit.__path__)}
    assert set(qemukit.SUBMODULES) <= on_disk
    assert not {"cli", "pytest_plugin", "_sync", "_fs"} & set(qemukit.SUBMODULES)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qemukit.nonexistent  # noqa: B018
