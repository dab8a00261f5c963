"""What a plugin derives from a tuple of endpoints, kept with the tuple.

The datastore makes a new endpoint tuple whenever the set, a name or labels change; the director
hands the same candidate tuple while the pool, Envoy's subset hint and the stale endpoints stay
the same; filters' results reach the next plugins as tuples. So a value computed from a tuple
(rows, a name -> position map) holds for as long as the same tuple comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from epp.framework.datamodel import Endpoint

T = TypeVar("T")


class PerTuple(Generic[T]):
    """Values made from tuples of endpoints, kept for the last `size` tuples by identity (the
    oldest forgotten first). Each tuple is held with its value, so its id cannot be reused by
    another tuple while it is kept; a tuple cannot change."""

    __slots__ = ("_kept", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._kept: dict[int, tuple[tuple[Endpoint, ...], T]] = {}

    def get(self, endpoints: tuple[Endpoint, ...], make: Callable[[tuple[Endpoint, ...]], T]) -> T:
        """The value kept for `endpoints`, else `make(endpoints)`, kept from now on."""
        kept = self._kept.get(id(endpoints))
        if kept is not None and kept[0] is endpoints:
            return kept[1]
        value = make(endpoints)
        if len(self._kept) >= self._size:
            del self._kept[next(iter(self._kept))]
        self._kept[id(endpoints)] = (endpoints, value)
        return value

    def __len__(self) -> int:
        return len(self._kept)
