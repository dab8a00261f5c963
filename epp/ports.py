"""The one port-number check every input path shares (flags, endpoint files, pool specs)."""

from __future__ import annotations


def port_number(value: object, *, allow_zero: bool = False, allow_text: bool = True) -> int:
    """`value` as a TCP port: an int, an integral float, or (with `allow_text`) its decimal text.
    0 ("any free port") only with `allow_zero`. Raises ValueError saying what was expected."""
    low = 0 if allow_zero else 1
    expected = f"port must be an integer {low}-65535, got {value!r}"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        port = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and allow_text and value.strip().isdigit()
    ):
        port = int(value)
    else:
        raise ValueError(expected)
    if not low <= port <= 65535:
        raise ValueError(expected)
    return port
