#!/usr/bin/env python3
"""Restore-to-running against a cold boot of the same guest, in one run (prints JSON).

    python scripts/bench_snapshot.py [--runs N]

The same measurement as ``scripts/bench --only restore``: see
``scripts/benchmarks/restore.py``, whose ``measure(runs)`` both call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks.restore import measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse ``--runs``, measure, print the result as JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="boots and restores to time (median)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
