"""Identifiers a client chooses (a fairness id, a session id), kept with a bound on their size.

Whatever is keyed by one (queues, programs, session bindings, metric labels) would otherwise hold
as much of a client's header as Envoy lets through (60 kB by default).
"""

from __future__ import annotations

import xxhash


def bounded_id(value: str, max_chars: int) -> str:
    """`value` itself up to `max_chars` characters; a longer one as `xxh3:<its 128-bit hash>`
    (a collision between two clients' long ids is as unlikely as a hash's)."""
    if len(value) <= max_chars:
        return value
    return "xxh3:" + xxhash.xxh3_128_hexdigest(value.encode("utf-8", "surrogatepass"))
