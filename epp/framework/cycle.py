"""Per-request scratch space shared by the plugins of one scheduling cycle, with typed keys.

A producer declares what it publishes as a `DataKey[T]`; consumers read it back as a `T | None`,
so every read is type-checked:

    PREFIX_MATCH = DataKey[PrefixMatch]("prefix-cache-match", "approx-prefix-cache-producer")
    cycle.write(PREFIX_MATCH, match)
    match = cycle.read(PREFIX_MATCH)          # PrefixMatch | None
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class DataKey(Generic[T]):
    """Names data of one `kind` published by one producer (by plugin name). Two keys are equal
    when kind and producer are; `str(key)` is `kind/producer`."""

    __slots__ = ("_hash", "kind", "producer")

    def __init__(self, kind: str, producer: str) -> None:
        self.kind = kind
        self.producer = producer
        self._hash = hash((kind, producer))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataKey) and other.kind == self.kind and other.producer == self.producer

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.kind}/{self.producer}"

    def __repr__(self) -> str:
        return f"DataKey({self.kind!r}, {self.producer!r})"

    def for_producer(self, producer: str) -> DataKey[T]:
        """The same kind of data, published by another producer."""
        return DataKey(self.kind, producer)


class CycleState:
    """Scratch space shared by the plugins of one scheduling cycle (one request)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[DataKey[Any], Any] = {}

    def read(self, key: DataKey[T]) -> T | None:
        return cast("T | None", self._data.get(key))

    def write(self, key: DataKey[T], value: T) -> None:
        self._data[key] = value
