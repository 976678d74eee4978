"""cloud-init NoCloud seeds and ssh access to seeded guests (the public face of the seed code).

The seed is written at launch by :mod:`qemukit._launch.seed`; this module is
where users import its names from.
"""

from __future__ import annotations

from ._launch.seed import (
    SEED_DEVICE_ID,
    SSH_OPTIONS_THROWAWAY,
    Seed,
    UsernetForward,
    build_seed,
    default_user_data,
    generate_keypair,
    identity_file,
    meta_data,
    parse_usernet,
    read_seed_iso,
    seed_device_args,
    ssh_argv,
    wait_for_ssh,
    write_seed_iso,
)

__all__ = [
    "SEED_DEVICE_ID",
    "SSH_OPTIONS_THROWAWAY",
    "Seed",
    "UsernetForward",
    "build_seed",
    "default_user_data",
    "generate_keypair",
    "identity_file",
    "meta_data",
    "parse_usernet",
    "read_seed_iso",
    "seed_device_args",
    "ssh_argv",
    "wait_for_ssh",
    "write_seed_iso",
]
