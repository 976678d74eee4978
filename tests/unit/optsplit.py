"""QEMU's own reading of a ``key=value,...`` option string, for checking argv.

QEMU's option parsers (QemuOpts for -name/-chardev/-netdev, keyval for
-blockdev) read a value up to the first ',' that is not followed by another
',', and take ',,' as one literal ','. The scan is greedy, left to right.
This is written from that rule, independently of qemukit's ``quote_opt``.
"""

from __future__ import annotations


def split_opts(text: str) -> list[str]:
    """Split ``text`` into its elements the way QEMU does."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def parse_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """The option string as QEMU sees it: a dict of keys to values.

    ``implied`` names the key a bare first element belongs to (``guest`` for
    -name, ``backend`` for -chardev, ``type`` for -netdev). A repeated key or
    a later element without '=' is an error, since QEMU would read it as a
    different option than intended.
    """
    result: dict[str, str] = {}
    for index, part in enumerate(split_opts(text)):
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0 and implied is not None:
                key, value = implied, part
            else:
                raise ValueError(f"element {part!r} of {text!r} has no '='")
        if key in result:
            raise ValueError(f"key {key!r} repeated in {text!r}")
        result[key] = value
    return result
