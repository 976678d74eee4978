"""A griffe extension for the API reference: Sphinx roles in qemukit's docstrings as code.

qemukit's docstrings name other objects the Sphinx way (``:class:`AsyncVM```,
``:func:`~qemukit.kernel.run_in_vm```), which Markdown would show as a stray
``:class:`` before a code span. This writes each as a code span of the name
(``~`` keeps the last component, as in Sphinx). mkdocs.yml loads it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const|envvar|term):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring griffe loads as code spans."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
