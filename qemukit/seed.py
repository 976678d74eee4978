"""cloud-init NoCloud seeds and ssh access to seeded guests (the public face of the seed code).

The seed is written at launch by :mod:`qemukit._launch.seed`; this module is
where users import its names from: the same names, the same objects.
"""

from __future__ import annotations

from ._launch.seed import *  # noqa: F403 - re-exports exactly that module's __all__
from ._launch.seed import __all__ as __all__
