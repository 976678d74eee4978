"""The ``qemukit`` command: parsing, printing and exit codes over the library.

Every command reports a qemukit error the same way: :class:`QemukitGroup`
(the ``main`` group) catches it, prints ``qemukit: <message>`` and exits
with the code :data:`EXIT_CODES` gives its class; no command picks its own.
``run -- CMD``, ``exec`` and ``ssh`` otherwise exit with the command's own
status, so every error code of a class those can raise lies above 123.
The table is printed in ``qemukit --help`` and the README.

The package: ``_common`` holds what every command shares (the group, the
table, the spec options, attaching to a VM); each other module defines its
commands and lists them in ``COMMANDS``. This module names them in
:data:`LAZY_COMMANDS`, and the group imports a command's module when that
command runs (or is completed), so ``qemukit --help`` and ``qemukit ls``
import nothing they do not use; tests/unit/test_imports.py checks the
table against the modules.
Nothing imports this module but the ``qemukit`` entry point and tests.
"""

from __future__ import annotations

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

#: Every command: its module in this package and the first paragraph of its help
#: (what ``--help`` lists, without importing the module).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    'bisect': ('_bisect',
        'Find the commit that broke TEST: git bisect run with a qemukit verdict.'),
    'cache': ('_cache',
        'List and prune the saved warm states that later starts restore from.'),
    'cmdline': ('_run',
        'Print the QEMU command line a VM would run with, without starting it.'),
    'console': ('_detached',
        "Attach to a VM's serial console. Press Ctrl-] to detach (the VM keeps running)."),
    'cp': ('_files',
        'Copy files between the host and a running VM: qemukit cp [-r] SRC DST.'),
    'devices': ('_hotplug',
        'List the devices hot-plugged into VM NAME that are still plugged.'),
    'doctor': ('_doctor',
        "Report QEMU, KVM (with the probe boot's verdict), firmware and images."),
    'dump': ('_debug',
        "Write VM NAME's guest memory to FILE (new) as an ELF core; the guest runs on."),
    'exec': ('_detached',
        "Run CMD in a running VM's guest; exit with its status."),
    'fork': ('_fork',
        'Fork the running VM NAME into COUNT clones that run on from this moment; NAME runs on.'),
    'gc': ('_detached',
        'Remove entries of dead VMs; kill QEMUs whose owner died (die-with-parent VMs).'),
    'hotplug': ('_hotplug',
        "Plug a disk, NIC, CPUs or memory into the running VM NAME; prints the new device's id."),
    'images': ('_images',
        'Build, import and list guest images.'),
    'kconfig': ('_kernel',
        'Print the config fragment a kernel needs under qemukit, or merge it into TREE/.config.'),
    'kill': ('_detached',
        "SIGKILL a VM's QEMU at once (no QMP needed) and remove its entry."),
    'kunit': ('_suites',
        'Boot a KUnit kernel (--kernel TREE or image) and report each KUnit test.'),
    'logs': ('_detached',
        "Print a VM's console log (or QEMU's own output with --qemu)."),
    'ls': ('_detached',
        'List VMs: name, pid, state (from QMP), accelerator, uptime, CPU %, RSS, ports.'),
    'matrix': ('_matrix',
        'Run every job of the matrix FILE (TOML) and report; exit 1 if any job did not pass.'),
    'mcp': ('_mcp',
        'Serve MCP over stdin/stdout: tools to start a VM, exec, read/write files, stop it.'),
    'net': ('_net',
        'Private networks of running VMs: give the host a port into one (net forward).'),
    'pause': ('_hotplug',
        "Pause VM NAME's vCPUs (returns once QEMU reports STOP)."),
    'ports': ('_files',
        "List a running VM's port forwards: guest port, protocol, host address, auto or static."),
    'qmp': ('_detached',
        'Send a raw QMP command; ARGUMENTS is a JSON object. Prints the reply as JSON.'),
    'restore': ('_snapshot',
        'Start a clone of the VM saved in BUNDLE: it resumes where it was saved, without booting.'),
    'resume': ('_hotplug',
        'Resume the paused VM NAME (returns once QEMU reports RESUME).'),
    'run': ('_run',
        'Boot a VM; with -- CMD, run CMD in the guest, print its output, stop, exit with its code.'),
    'save': ('_snapshot',
        "Save a running VM's live state to BUNDLE (a new directory), then stop the VM."),
    'shell': ('_files',
        'Open a shell in a running VM, or run one command: qemukit shell NAME [-- CMD...].'),
    'snapshot': ('_snapshot',
        'Snapshots of a running VM: save|load|delete TAG, list, external|revert|commit TAG.'),
    'ssh': ('_guest',
        'Log in to a running VM over ssh, or run CMD there: qemukit ssh NAME [-- CMD...].'),
    'stop': ('_detached',
        'Stop a VM through the ladder (ACPI, quit, SIGTERM, SIGKILL); prints the rung that worked.'),
    'templates': ('_templates',
        'Built-in VM templates: use one with -f NAME.toml\'s ``base = "NAME"``.'),
    'unplug': ('_hotplug',
        'Unplug the hot-plugged device ID from VM NAME; returns once it and its backend are gone.'),
}

main.lazy_commands.update(LAZY_COMMANDS)
