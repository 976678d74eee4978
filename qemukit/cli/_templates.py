"""``qemukit templates ls|show``: the built-in VM templates a spec file can name as its base."""

from __future__ import annotations

import json
from dataclasses import asdict

import click


@click.group()
def templates() -> None:
    """Built-in VM templates: use one with -f NAME.toml's ``base = "NAME"``."""


@templates.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of {name, description, base, image}.")
def ls(as_json: bool) -> None:
    """List the built-in templates: name, base, description."""
    from ..templates import list_templates

    found = list_templates()
    if as_json:
        click.echo(json.dumps([asdict(t) for t in found], indent=2))
        return
    width = max(len(t.name) for t in found)
    click.echo(f"{'NAME':<{width}}  {'BASE':<12}  DESCRIPTION")
    for t in found:
        base = t.base or (f"image {t.image}" if t.image else "-")
        click.echo(f"{t.name:<{width}}  {base:<12}  {t.description}")


@templates.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Print template NAME (or a spec FILE) as TOML with its base chain merged in."""
    from ..templates import dumps, resolve

    data, _ = resolve(name)
    click.echo(dumps(data), nl=False)


COMMANDS = (templates,)
