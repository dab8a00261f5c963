"""Metric children keyed by label sets that requests choose, bounded in number.

A label value from a request (a model name, a fairness id) is the client's to choose, so the
children made for them must be capped: `CappedChildren` makes a set's children once, and past
`limit` sets maps a new set to its overflow set (e.g. every label "other"), made once too. Sets
admitted before keep their own children, so paired gauge updates stay balanced.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CappedChildren(Generic[K, V]):
    """`get(key)`: the children of label set `key` (made by `make`), or past `limit` sets, those of
    `overflow(key)`."""

    __slots__ = ("_children", "_limit", "_make", "_overflow")

    def __init__(self, limit: int, make: Callable[[K], V], overflow: Callable[[K], K]) -> None:
        self._limit = limit
        self._make = make
        self._overflow = overflow
        self._children: dict[K, V] = {}

    def get(self, key: K) -> V:
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= self._limit:
                key = self._overflow(key)
                children = self._children.get(key)
            if children is None:
                children = self._children[key] = self._make(key)
        return children

    def __len__(self) -> int:
        return len(self._children)
