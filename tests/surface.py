"""qemukit's public surface as data: every public name, its signature, the CLI tree.

``tests/unit/test_surface.py`` compares it with ``tests/unit/golden/surface.json``
so a restructuring cannot change what users import or type by accident.
After an intended change, rewrite the golden file and review its diff::

    .venv/bin/python -m tests.surface --write
"""

from __future__ import annotations

import enum
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "unit" / "golden" / "surface.json"

#: The modules users import from (README, docstrings): their ``__all__`` is the surface.
PUBLIC_MODULES = (
    "qemukit",
    "qemukit.errors",
    "qemukit.spec",
    "qemukit.images",
    "qemukit.kconfig",
    "qemukit.kernel",
    "qemukit.resolve",
    "qemukit.matrix",
    "qemukit.hotplug",
    "qemukit.snapshot",
    "qemukit.qga",
    "qemukit.guest",
    "qemukit.seed",
    "qemukit.host",
    "qemukit.vm",
    "qemukit.dump",
    "qemukit.warm",
    "qemukit.ktap",
    "qemukit.results",
    "qemukit.crashdir",
    "qemukit.kselftest",
    "qemukit.bisect",
    "qemukit.gdbscripts",
    "qemukit.testing",
)


def _signature(obj: Any) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(?)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # default values' reprs carry addresses


def _describe_class(cls: type) -> dict[str, Any]:
    if issubclass(cls, enum.Enum):
        return {"kind": "enum", "members": [m.name for m in cls]}
    members: dict[str, str] = {}
    for name in sorted(dir(cls)):
        if name.startswith("_") and name not in ("__init__", "__enter__", "__aenter__"):
            continue
        raw = inspect.getattr_static(cls, name)
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner.__module__.split(".")[0] != "qemukit":
            continue  # inherited from Exception, object, ...
        if isinstance(raw, property) or type(raw).__name__ == "delegated":
            members[name] = "property"
        elif isinstance(raw, classmethod):
            members[name] = "classmethod" + _signature(getattr(cls, name))
        elif isinstance(raw, staticmethod):
            members[name] = "staticmethod" + _signature(getattr(cls, name))
        elif inspect.iscoroutinefunction(raw):
            members[name] = "async" + _signature(raw)
        elif callable(raw):
            members[name] = _signature(raw)
        else:
            members[name] = "attribute"
    return {"kind": "class", "bases": [b.__name__ for b in cls.__bases__], "members": members}


def _describe(obj: Any) -> dict[str, Any]:
    if inspect.isclass(obj):
        return _describe_class(obj)
    if inspect.iscoroutinefunction(obj):
        return {"kind": "async function", "signature": _signature(obj)}
    if callable(obj):
        return {"kind": "function", "signature": _signature(obj)}
    return {"kind": type(obj).__name__}


def _cli_tree() -> dict[str, Any]:
    import click

    from qemukit.cli import main

    def walk(cmd: click.Command, path: str, out: dict[str, Any]) -> None:
        params = []
        for p in cmd.params:
            entry = "/".join(p.opts + p.secondary_opts) if isinstance(p, click.Option) else p.name
            params.append(f"{entry}:{p.type.name}" + ("*" if getattr(p, "multiple", False) else ""))
        out[path] = params
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in sorted(cmd.list_commands(ctx)):  # main's are imported on first use
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, f"{path} {name}", out)

    tree: dict[str, Any] = {}
    walk(main, "qemukit", tree)
    return tree


def collect() -> dict[str, Any]:
    """The whole surface: ``{"modules": {module: {name: description}}, "cli": {...}}``."""
    modules: dict[str, Any] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = sorted(getattr(module, "__all__", ()))
        modules[module_name] = {name: _describe(getattr(module, name)) for name in names}
    return {"modules": modules, "cli": _cli_tree()}


def main(argv: list[str]) -> int:
    """``--write`` rewrites the golden file; otherwise print the surface."""
    text = json.dumps(collect(), indent=1, sort_keys=True) + "\n"
    if argv[1:] == ["--write"]:
        GOLDEN.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
