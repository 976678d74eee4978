"""A griffe extension for the API reference: the reST habits of qemukit's docstrings, as Markdown.

qemukit's docstrings are written for Sphinx and ``help()``; Markdown would show
some of their markup wrongly. This rewrites, in each docstring griffe loads:

- a role (``:class:`AsyncVM```, ``:func:`~qemukit.kernel.run_in_vm```) as a
  code span of the name (``~`` keeps the last component, as in Sphinx);
- a paragraph ending in ``::`` (an indented literal block follows) with ``:``;
- a doctest (lines starting ``>>>``, then ``...``) as a fenced ``pycon`` block,
  which Markdown would otherwise read as nested block quotes.

mkdocs.yml loads it (mkdocstrings' python handler, ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const|envvar|term):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _fence_doctests(text: str) -> str:
    out: list[str] = []
    in_doctest = False
    for line in text.splitlines():
        stripped = line.lstrip()
        starts = stripped.startswith(">>>")
        goes_on = in_doctest and stripped.startswith("...")
        if starts and not in_doctest:
            out.append("```pycon")
            in_doctest = True
        elif in_doctest and not (starts or goes_on):
            out.append("```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """``text`` (a docstring) with its Sphinx roles, literal-block markers and doctests in Markdown."""
    return _fence_doctests(LITERAL.sub(":", ROLE.sub(_code, text)))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring griffe loads with :func:`to_markdown`."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
