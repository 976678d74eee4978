"""``qemukit kconfig``: the kernel config fragment qemukit needs, printed or merged into a tree."""

from __future__ import annotations

import os

import click

from .. import errors
from ..arch import ARCHES, DEFAULT_ARCH, host_arch_name

__all__ = ["COMMANDS", "kconfig"]


@click.command()
@click.option("--arch", type=click.Choice(list(ARCHES)),
              help="Guest architecture [default: the tree's built one, else x86_64].")
@click.option("--print", "show", is_flag=True, help="Print the fragment (also with TREE).")
@click.argument("tree", required=False, type=click.Path(file_okay=False, exists=True))
def kconfig(arch: str | None, show: bool, tree: str | None) -> None:
    """Print the config fragment a kernel needs under qemukit, or merge it into TREE/.config.

    \b
    Examples:
      qemukit kconfig --print --arch aarch64
      make tinyconfig && qemukit kconfig . && make -j$(nproc)
    With TREE the fragment is merged with the tree's own
    scripts/kconfig/merge_config.sh -m, then make olddefconfig runs; options
    olddefconfig dropped (their dependencies unmet) are named and the exit
    status is 125.
    """
    from .. import kconfig as kc

    if tree is None or show:
        click.echo(kc.fragment(arch or DEFAULT_ARCH), nl=False)
    if tree is None:
        return
    if arch is None:
        arch = _tree_arch(tree)
    result = kc.merge_into_tree(tree, arch)
    if result.dropped:
        wanted = kc.fragment_options(arch)
        raise kc.missing_error(
            tree, result.config,
            [(name, f"wanted {wanted[name]}, olddefconfig left {value}")
             for name, value in sorted(result.dropped.items())],
            hint="make olddefconfig dropped them, their dependencies unmet "
                 "(make menuconfig, then / and the name, shows what each depends on)")
    click.echo(f"qemukit: merged the {arch} fragment into {result.config} "
               f"({len(kc.fragment_options(arch))} options, none dropped)", err=True)


def _tree_arch(tree: str) -> str:
    """The architecture a tree is built for, if it is built; else the host's (or the default)."""
    from ..kconfig import find_tree

    try:
        return find_tree(tree).arch
    except errors.SpecError:
        return host_arch_name(os.uname().machine) or DEFAULT_ARCH


COMMANDS = (kconfig,)
