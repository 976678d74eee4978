"""Templates: spec files that name a base, and the built-in ones shipped with qemukit.

A spec file (``qemukit run -f vm.toml``) may say ``base = "other.toml"`` (a
path relative to it) or ``base = "debian-dev"`` (a built-in template) and
override fields of it; :func:`qemukit.spec.resolve_spec_file` says how keys
merge (scalars replaced, tables merged, lists such as ``drives`` and
``shares`` replaced whole). A file may also name a built-in image
(``image = "tiny"`` or ``"debian"``, as the built-in templates do): its
fields are the bottom layer, under every file of the chain.

The built-in templates are the ``*.toml`` files of this package:
``tiny``, ``debian``, ``debian-dev`` (more CPUs and memory, ``${PWD}``
shared at ``/mnt/host``) and ``kernel-test``. :func:`load_spec` turns a file
or a template name into a :class:`~qemukit.spec.VMSpec`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import images
from ..errors import SpecError
from ..spec import (
    TEMPLATE_DIR,
    VMSpec,
    load_toml,
    resolve_spec_file,
    spec_from_resolved,
    template_names,
)

__all__ = ["TemplateInfo", "dumps", "list_templates", "load_spec", "resolve"]


@dataclass(frozen=True)
class TemplateInfo:
    """One built-in template: its name, what it is for, what it is based on."""

    name: str
    description: str
    base: str | None
    image: str | None


def list_templates() -> list[TemplateInfo]:
    """The built-in templates, by name."""
    out = []
    for name in template_names():
        data, _ = resolve(name)
        own = load_toml(TEMPLATE_DIR / f"{name}.toml")
        out.append(TemplateInfo(name=name, description=str(data.get("description", "")),
                                base=own.get("base"), image=data.get("image")))
    return out


def _path_for(source: str | Path) -> Path:
    """A template name's file, or ``source`` itself when it names a file."""
    text = str(source)
    if "/" in text or text.endswith(".toml"):
        return Path(source)
    if text not in template_names():
        raise SpecError("template", text, f"unknown template; built-in: {', '.join(template_names())}")
    return TEMPLATE_DIR / f"{text}.toml"


def resolve(source: str | Path, *, cwd: str | Path | None = None
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged table of a template name or spec file, and where each key came from."""
    return resolve_spec_file(_path_for(source), cwd=cwd)


def load_spec(source: str | Path, *, cwd: str | Path | None = None, **overrides: Any) -> VMSpec:
    """The :class:`VMSpec` a spec file or template name describes; ``overrides`` win last.

    A chain naming a built-in image needs it built (:class:`~qemukit.errors.HostError`
    otherwise, saying the command that builds it).
    """
    data, origins = resolve(source, cwd=cwd)
    data = {**data, **overrides}
    origins = {**origins, **dict.fromkeys(overrides, "override")}
    image = data.get("image")
    if image is not None:
        if image not in images.NAMES:
            raise SpecError(f"{origins['image']}: image", image,
                            f"unknown image; choose from {', '.join(images.NAMES)}")
        given = {k: data[k] for k in ("arch", "kernel", "initrd") if k in data}
        bottom = images.spec(image, **given).to_dict()
        data = _merge_over(bottom, data)
    return spec_from_resolved(data, origins)


def _merge_over(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge_over(out[key], value)
        else:
            out[key] = value
    return out


def _value(value: Any) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML (after \uXXXX escapes).
    return json.dumps(value)


def dumps(data: Mapping[str, Any]) -> str:
    """A resolved table as TOML text (plain keys first, then tables and arrays of tables)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables.extend(f"{k} = {_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables.extend(f"{k} = {_value(v)}" for k, v in item.items())
        else:
            lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines + tables) + "\n"
