"""The ``qemukit`` command: parsing, printing and exit codes over the library.

Every command reports a qemukit error the same way: :class:`QemukitGroup`
(the ``main`` group) catches it, prints ``qemukit: <message>`` and exits
with the code :data:`EXIT_CODES` gives its class; no command picks its own.
``run -- CMD``, ``exec`` and ``ssh`` otherwise exit with the command's own
status, so every error code of a class those can raise lies above 123.
The table is printed in ``qemukit --help`` and the README.

The package: ``_common`` holds what every command shares (the group, the
table, the spec options, attaching to a VM); each other module defines its
commands and lists them in ``COMMANDS``; this module adds them to the group.
Nothing imports this module but the ``qemukit`` entry point and tests.
"""

from __future__ import annotations

from . import (
    _cache,
    _debug,
    _detached,
    _doctor,
    _files,
    _guest,
    _hotplug,
    _images,
    _kernel,
    _matrix,
    _mcp,
    _run,
    _snapshot,
    _templates,
)
from ._common import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OOPS,
    EXIT_PANIC,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    QemukitGroup,
    build_spec,
    exit_code_for,
    exit_code_for_outcome,
    exit_code_for_outcomes,
    exit_codes_help,
    main,
    spec_options,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OOPS",
    "EXIT_PANIC",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "QemukitGroup",
    "build_spec",
    "exit_code_for",
    "exit_code_for_outcome",
    "exit_code_for_outcomes",
    "exit_codes_help",
    "main",
    "spec_options",
]

for _module in (_run, _detached, _guest, _files, _hotplug, _snapshot, _debug, _doctor, _images,
                _matrix, _cache, _kernel, _templates, _mcp):
    for _command in _module.COMMANDS:
        main.add_command(_command)
