"""The architecture as a checked contract: layers that only import downward, no cycles,
no click or pytest in the library, and no module reading another's private names.

The import graph is read from the source (module-level imports and the lazy ones inside
functions alike; ``if TYPE_CHECKING:`` blocks are left out, they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qemukit"

#: Lowest first. A module may import its own layer and the layers below, never above.
#: An entry is a top-level module or package, or a dotted module inside one, which then
#: has the layer given here rather than its package's.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "paths", "timeouts", "arch", "spec", "_fs", "_proc", "_aio", "_sync", "results", "ktap"),
    ("_launch",),
    ("host",),
    # Carrying out a launch plan uses the host's probes (overlays, virtiofsd), which
    # themselves use the rest of _launch (process, plan): this one module sits above host.
    ("_launch.start",),
    ("images", "rootfs", "kconfig"),
    ("templates",),
    ("_wire",),
    ("target",),
    ("hotplug", "snapshot", "guest", "dump", "ports", "identity", "_access"),
    ("warm",),
    ("vm",),
    ("resolve",),
    ("kernel", "crashdir", "kselftest", "gdbscripts"),
    ("matrix", "bisect"),
    ("cli", "pytest_plugin", "qga", "seed", "mcp", "testing"),
]
#: The only places that may import the CLI and test frameworks.
FRONT_ENDS = ("cli", "pytest_plugin")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["qemukit", *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """Every qemukit import of one module (target, imported names, line), runtime only."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.found: list[tuple[str, list[str], int, bool]] = []  # (target, names, line, top-level)
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _in_function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _in_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self.depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = _resolve(self.module, node)
        names = [a.name for a in node.names]
        if target in MODULES and _is_package(target):
            # "from .pkg import mod" imports the submodule pkg.mod when there is one.
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for sub in subs:
                self.found.append((f"{target}.{sub}", [], node.lineno, self.depth == 0))
            names = [n for n in names if n not in subs]
            if not names:
                return
        self.found.append((target, names, node.lineno, self.depth == 0))


IMPORTS = {}
for _name, _path in MODULES.items():
    _visitor = _Imports(_name)
    _visitor.visit(ast.parse(_path.read_text()))
    IMPORTS[_name] = _visitor.found


def _layer(module: str) -> int | None:
    parts = module.split(".")[1:]
    for depth in range(len(parts), 0, -1):  # the most specific entry wins
        name = ".".join(parts[:depth])
        for index, members in enumerate(LAYERS):
            if name in members:
                return index
    return None


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if m != "qemukit" and _layer(m) is None]
    assert unplaced == [], f"add these to LAYERS: {unplaced}"


def test_layers_only_import_downward() -> None:
    upward = []
    for module, imports in IMPORTS.items():
        mine = _layer(module)
        if mine is None:
            continue  # the package's __init__: lazy re-exports of everything
        for target, _, line, _ in imports:
            theirs = _layer(target) if target.startswith("qemukit.") else None
            if theirs is not None and theirs > mine:
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


#: Inside a package, its modules' own order (lowest first), checked like LAYERS.
INNER_LAYERS: dict[str, list[tuple[str, ...]]] = {
    "qemukit.matrix": [("_file", "_slots"), ("_run", "_shipping"), ("_local", "_dask", "_report")],
}


@pytest.mark.parametrize("package", sorted(INNER_LAYERS))
def test_a_packages_modules_only_import_downward(package: str) -> None:
    order = {f"{package}.{m}": i for i, names in enumerate(INNER_LAYERS[package]) for m in names}
    inside = [m for m in MODULES if m.startswith(f"{package}.")]
    assert sorted(inside) == sorted(order), f"place these in INNER_LAYERS: {set(inside) ^ set(order)}"
    upward = [f"{module}:{line} imports {target}"
              for module in inside for target, _, line, _ in IMPORTS[module]
              if order.get(target, -1) > order[module]]
    assert upward == []


def test_no_import_cycle_at_import_time() -> None:
    graph = {m: {t for t, _, _, top in imports if top and t in MODULES and t != m}
             for m, imports in IMPORTS.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package importing its own submodules is how re-exports work, not a cycle.
    real = [c for c in cycles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert real == []


@pytest.mark.parametrize("framework", ["click", "pytest"])
def test_the_library_never_imports_front_end_frameworks(framework: str) -> None:
    offenders = [f"{m}:{line}" for m, imports in IMPORTS.items()
                 if _layer(m) is not None and m.split(".")[1] not in FRONT_ENDS
                 for target, _, line, _ in imports if target.split(".")[0] == framework]
    assert offenders == []


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [f"{m}:{line} imports {n} from {t}"
                 for m, imports in IMPORTS.items() for t, names, line, _ in imports
                 if t.startswith("qemukit") and t != m
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def _own_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: its functions, methods, classes, self._x attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self":
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def test_no_module_reads_private_attributes_it_does_not_define() -> None:
    """``x._name`` only for a ``_name`` this module defines (its own classes' insides).

    So no module reaches into another module's objects (AsyncVM's ``_proc`` from
    hotplug, say), nor into another library's (qemu.qmp's, pytest's).
    """
    offenders = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in own):
                owner = ast.unparse(node.value)
                if (owner, node.attr) not in ALLOWED:
                    offenders.append(f"{module}:{node.lineno} {owner}.{node.attr}")
    assert offenders == []


#: Private attributes of others that are meant to be used, each with its reason.
ALLOWED = {
    ("os", "_exit"),  # the documented way to leave a forked child without cleanup
}


#: Pure: a command line can be built, printed and tested without QEMU or I/O.
PURE = ("qemukit.spec", "qemukit._launch.argv", "qemukit._launch.plan")
IO_MODULES = {"subprocess", "socket", "asyncio"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_reach_no_io(module: str) -> None:
    seen, todo, reached = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target, _, _, _ in IMPORTS[name]:
            if target in MODULES:
                todo.append(target)
            else:
                reached.add(target.split(".")[0])
    assert "qemukit.errors" in seen
    assert reached & IO_MODULES == set(), f"{module} reaches {reached & IO_MODULES} through {seen}"
