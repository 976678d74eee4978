"""The public surface (names, signatures, the CLI tree) equals its golden file."""

from __future__ import annotations

import json

from tests.surface import GOLDEN, collect


def test_public_surface_matches_the_golden_file() -> None:
    golden = json.loads(GOLDEN.read_text())
    current = json.loads(json.dumps(collect(), sort_keys=True))
    for module in sorted(set(golden["modules"]) | set(current["modules"])):
        assert current["modules"].get(module) == golden["modules"].get(module), (
            f"{module} changed; if intended: python -m tests.surface --write")
    assert current["cli"] == golden["cli"], "the CLI changed; if intended: python -m tests.surface --write"
