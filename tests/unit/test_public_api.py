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
    names = {str(p.relative_to(PACKAGE_DIR)) for p in SOURCES}
    assert {"__init__.py", "spec.py", "errors.py", "_launch/argv.py", "vm/_core.py",
            "cli/__init__.py"} <= names


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
    assert issubclass(qemukit.CommandFailed, qemukit.GuestError)  # succeed()/fail()
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
    members: list[tuple[str, object]] = []
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
    assert "qemukit" in imported
    # Even the spec is loaded at the first use of one of its names (tests/unit/test_imports.py).
    heavy = {"asyncio", "qemu.qmp", "qemukit.vm", "qemukit.images", "qemukit.spec", "psutil",
             "click"}
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


def test_lint_and_test_tools_are_the_pinned_versions() -> None:
    """scripts/setup installs with -c constraints.txt; the tools running here are those."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (PACKAGE_DIR.parent / "constraints.txt").read_text()
                .splitlines() if "==" in line and not line.startswith("#"))
    assert {"ruff", "mypy", "pytest"} <= set(pins)
    assert {name: version(name) for name in pins} == pins


def test_the_vm_pool_is_public_and_loaded_on_first_use() -> None:
    assert {"AsyncVMPool", "VMPool"} <= set(qemukit.__all__)
    _run_fresh("import qemukit, sys\n"
               "assert 'qemukit.vm' not in sys.modules\n"
               "assert qemukit.VMPool is sys.modules['qemukit.vm'].VMPool\n"
               "assert qemukit.AsyncVMPool is qemukit.VMPool(qemukit.VMSpec(warm=True)).aio.__class__\n")
