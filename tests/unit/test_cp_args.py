"""``qemukit cp``'s NAME:PATH parsing: exactly one side in the guest, host paths with ':' escapable."""

from __future__ import annotations

import pytest

from qemukit.cli._files import GuestPath, parse_cp_args, parse_location
from qemukit.errors import SpecError


@pytest.mark.parametrize(("text", "expected"), [
    ("vm1:/tmp/x", GuestPath("vm1", "/tmp/x")),
    ("my-vm.2:rel/path", GuestPath("my-vm.2", "rel/path")),
    ("vm:/a:b", GuestPath("vm", "/a:b")),
    ("/abs/a:b", "/abs/a:b"),
    ("./a:b", "./a:b"),
    ("~/x:y", "~/x:y"),
    ("plain", "plain"),
])
def test_locations(text: str, expected: object) -> None:
    assert parse_location(text) == expected


def test_one_side_remote_either_way() -> None:
    assert parse_cp_args("f", "vm:/tmp/") == ("f", GuestPath("vm", "/tmp/"))
    assert parse_cp_args("vm:/etc/os-release", ".") == (GuestPath("vm", "/etc/os-release"), ".")


@pytest.mark.parametrize(("src", "dst", "words"), [
    ("a:/x", "b:/y", "both sides"),
    ("a", "b", "neither side"),
    ("vm:", "x", "after the colon"),
])
def test_bad_pairs_name_the_problem(src: str, dst: str, words: str) -> None:
    with pytest.raises(SpecError, match=words):
        parse_cp_args(src, dst)
