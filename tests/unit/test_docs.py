"""The documentation site: it builds with warnings as errors, covers the public surface, and the
code blocks marked runnable do what they say.

A fenced block is runnable when the line before its fence is ``<!-- runnable -->``:

- a ``python`` block is run as a script in a subprocess (in a temporary directory; it must not
  need QEMU to boot anything) and must exit 0;
- a ``sh`` block is checked command by command: each ``qemukit ...`` in it must name a real
  subcommand whose arguments and options parse (click, without running it). A path the example
  names that does not exist here is the reader's, so click's "does not exist" is accepted, and
  nothing else is.

``<!-- runnable: run -->`` before a ``sh`` block also runs each of its lines (an argv list, no
shell) and expects exit 0: keep those to commands that boot nothing (``cmdline``, ``--help``).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<mode>run))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+)(?P<lang>[\w-]*)")
# Modules whose API page must list every name of their __all__ (tests/surface.py's public modules,
# plus the front ends users import: the MCP sandbox and the pytest plugin's fixtures).
API_PAGES = {
    "qemukit": "qemukit", "qemukit.errors": "errors", "qemukit.spec": "spec", "qemukit.vm": "vm",
    "qemukit.guest": "guest", "qemukit.hotplug": "hotplug", "qemukit.snapshot": "snapshot",
    "qemukit.dump": "dump", "qemukit.kernel": "kernel", "qemukit.resolve": "resolve",
    "qemukit.results": "results",
    "qemukit.kconfig": "kconfig",
    "qemukit.matrix": "matrix", "qemukit.images": "images", "qemukit.warm": "warm",
    "qemukit.host": "host", "qemukit.seed": "seed", "qemukit.qga": "qga", "qemukit.mcp": "mcp",
    "qemukit.pytest_plugin": "pytest_plugin", "qemukit.testing": "testing",
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    run: bool
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def runnable_blocks() -> list[Block]:
    """Every fenced block in docs/ whose fence follows a runnable marker."""
    blocks = []
    for path in sorted(DOCS.rglob("*.md")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            marker = MARKER.match(lines[i])
            fence = FENCE.match(lines[i + 1]) if marker and i + 1 < len(lines) else None
            if marker and fence is None:
                raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a runnable marker not "
                                     "followed by a fenced code block")
            if marker and fence:
                end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith(fence["fence"]))
                blocks.append(Block(str(path.relative_to(ROOT)), i + 2, fence["lang"],
                                    marker["mode"] == "run", "\n".join(lines[i + 2:end]) + "\n"))
                i = end
            i += 1
    return blocks


BLOCKS = runnable_blocks()


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link, anchor, nav entry or docstring fails the build."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_api_pages(site)
    _check_cli_page(site)


def _check_api_pages(site: Path) -> None:
    """Each public module's page has an entry for every name in its ``__all__``."""
    pages = {p.parent.name for p in (site / "reference" / "api").glob("*/index.html")}
    assert pages == set(API_PAGES.values())
    for module_name, page in API_PAGES.items():
        html = (site / "reference" / "api" / page / "index.html").read_text()
        ids = set(re.findall(r'id="([^"]+)"', html))
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:  # the pytest plugin: its fixtures
            names = [n for n in vars(module) if n.startswith("qemu_") and callable(getattr(module, n))]
            assert names
        missing = [n for n in names if f"{module_name}.{n}" not in ids]
        assert not missing, f"{page}: not in the API reference: {missing}"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in group.commands.items():
        if not cmd.hidden:
            found.append((*path, name))
            if isinstance(cmd, click.Group):
                found += _commands(cmd, (*path, name))
    return found


def _check_cli_page(site: Path) -> None:
    """The generated CLI page has a section for every command of the real click tree."""
    from qemukit.cli import main

    html = (site / "reference" / "cli" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)
    # A group's own arguments stand between it and its subcommands: "qemukit hotplug NAME disk".
    missing = [" ".join(c) for c in _commands(main)
               if not re.search("qemukit" + "".join(rf"(?: [A-Z_]+)* {re.escape(p)}\b" for p in c), text)]
    assert not missing, f"not in the CLI reference: {missing}"
    for option in ("--kernel", "--max-vms", "--scheduler", "--continue-on-oops"):
        assert option in text
    # mkdocs-click's table style shows click 8.3's unset defaults as "Sentinel.UNSET": the page
    # is click's own help text (plain style), as `qemukit COMMAND --help` prints it.
    assert "Sentinel" not in text


def test_runnable_blocks_found() -> None:
    """The marker is in use: Python run, shell parsed, shell run; a typo in it would hide them."""
    kinds = {(b.lang, b.run) for b in BLOCKS}
    assert {("python", False), ("sh", False), ("sh", True)} <= kinds, kinds
    assert not [b for b in BLOCKS if b.lang not in ("python", "sh")]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=str)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.text)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{block}:\n{proc.stdout}{proc.stderr}"


ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)
VARIABLE = re.compile(r"^\$(?:([A-Za-z_]\w*)|\{([A-Za-z_]\w*)\})$")


def shell_commands(text: str) -> list[list[str]]:
    """The ``qemukit`` commands of a shell block, each an argv (continuations joined,
    comments dropped, split at ``&&``, ``||``, ``;`` and ``|``). A variable the block
    assigns (``TLS="--tls-ca-file ca.pem ..."``) is expanded where it stands alone, as an
    unquoted ``$TLS`` is; any other ``$...`` is left as written."""
    commands = []
    variables: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                if argv and Path(argv[0]).name == "qemukit":
                    commands.append(argv)
                elif len(argv) == 1 and (assignment := ASSIGNMENT.match(argv[0])):
                    variables[assignment[1]] = assignment[2].split()
                argv = []
            elif (variable := VARIABLE.match(token)) and (variable[1] or variable[2]) in variables:
                argv += variables[variable[1] or variable[2]]
            else:
                argv.append(token)
    return commands


def _rest(ctx: click.Context) -> list[str]:
    # What a group left for its subcommand: click 8.2+ keeps the subcommand's name apart
    # (``protected_args``, deprecated as public, so read where click itself keeps it).
    return [*getattr(ctx, "_protected_args", ()), *ctx.args]


def parse_cli(argv: list[str]) -> None:
    """Resolve ``argv``'s subcommands in qemukit's click tree and parse their arguments,
    without running anything."""
    from qemukit.cli import main

    ctx = main.make_context("qemukit", argv[1:])
    cmd: click.Command = main
    args = _rest(ctx)
    while isinstance(cmd, click.Group) and args:
        name, sub, args = cmd.resolve_command(ctx, args)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, args, parent=ctx)
        cmd = sub
        args = _rest(ctx) if isinstance(sub, click.Group) else []


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "sh"], ids=str)
def test_shell_block_parses(block: Block) -> None:
    commands = shell_commands(block.text)
    assert commands, f"{block}: a runnable shell block without a qemukit command"
    for argv in commands:
        try:
            parse_cli(argv)
        except click.BadParameter as exc:
            if "does not exist" not in exc.format_message():
                pytest.fail(f"{block}: {shlex.join(argv)}: {exc.format_message()}")
        except click.ClickException as exc:
            pytest.fail(f"{block}: {shlex.join(argv)}: {exc.format_message()}")
    if block.run:
        for argv in commands:
            proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{block}: {shlex.join(argv)}:\n{proc.stdout}{proc.stderr}"


def test_shell_check_catches_bad_commands() -> None:
    """The shell check fails for a subcommand or an option that does not exist."""
    assert shell_commands("cd x && qemukit run --image tiny -- uname -a  # boot\nmake -j2\n") == [
        ["qemukit", "run", "--image", "tiny", "--", "uname", "-a"]]
    assert shell_commands('O="--jobs 2 --retries 1"\nqemukit matrix m.toml $O --json ${O}x $PWD') == [
        ["qemukit", "matrix", "m.toml", "--jobs", "2", "--retries", "1", "--json", "${O}x", "$PWD"]]
    with pytest.raises(click.UsageError):
        parse_cli(["qemukit", "boot", "--image", "tiny"])
    with pytest.raises(click.NoSuchOption):
        parse_cli(["qemukit", "run", "--imag", "tiny"])
    with pytest.raises(click.UsageError):
        parse_cli(["qemukit", "images", "build", "tiny", "--no-such-flag"])
    parse_cli(["qemukit", "images", "build", "tiny", "--arch", "aarch64"])


def test_readme_is_short_and_its_links_resolve() -> None:
    """README.md is what a newcomer needs (the two commands, the tiers, the benchmark table)
    plus links into the site, and every link names a file that exists."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)", text)
    assert len(links) >= 15
    assert not [link for link in links if not (ROOT / link).is_file()]
    assert len(text.splitlines()) <= 110
    assert "./scripts/setup && .venv/bin/qemukit run --image tiny -- uname -a" in text
    # CI runs exactly the README's test command.
    assert "\n./scripts/test\n" in text
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("./scripts/test")


def test_docstring_markup_to_markdown() -> None:
    """The griffe extension (docs/_ext) turns reST roles, ``::`` and doctests into Markdown."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sphinx_roles", DOCS / "_ext" / "sphinx_roles.py")
    assert spec is not None and spec.loader is not None
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    text = "See :class:`AsyncVM` and :func:`~qemukit.kernel.run_in_vm`::\n\n    x\n\n>>> a = 1\n... b\nafter"
    assert ext.to_markdown(text) == (
        "See `AsyncVM` and `run_in_vm`:\n\n    x\n\n```pycon\n>>> a = 1\n... b\n```\nafter")
