"""A plugin's `parameters` mapping, read through typed getters that fail with a clear message."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from epp.errors import ConfigError

_MISSING: Any = object()


class Params:
    """A plugin's `parameters` mapping with typed getters that fail with a clear message.

    The loader rejects parameters that the plugin never read (the Go EPP decodes strictly), so a
    typo is an error rather than a silently ignored setting. A plugin that reads the mapping by
    other means calls `raw()`. Go parameters that epp accepts but does not act on are declared
    with `unimplemented()`, which turns their presence into a warning.
    """

    __slots__ = ("_children", "_plugin", "_raw", "_read", "warnings")

    def __init__(self, raw: Mapping[str, Any] | None, plugin: str = "plugin") -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"parameters must be a mapping, got {type(raw).__name__}")
        self._raw: Mapping[str, Any] = raw or {}
        self._plugin = plugin
        self._read: set[str] = set()
        self._children: dict[str, Params] = {}
        self.warnings: list[str] = []

    def keys(self) -> set[str]:
        return set(self._raw)

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def raw(self) -> Mapping[str, Any]:
        """The whole mapping; every key counts as read."""
        self._read.update(self._raw)
        return self._raw

    def unread(self) -> list[str]:
        """Keys given in the config that the plugin never asked for (nested ones as `a.b`)."""
        out = [k for k in self._raw if k not in self._read]
        for key, child in self._children.items():
            out.extend(f"{key}.{k}" for k in child.unread())
        return sorted(out)

    def warn(self, message: str) -> None:
        """A configuration remark the loader reports (e.g. a value replaced by its default)."""
        self.warnings.append(message)

    def unimplemented(self, *keys: str, reason: str = "") -> None:
        """Accept Go parameters that epp does not act on; warn when one is set."""
        for key in keys:
            if key in self._raw:
                self._read.add(key)
                why = f": {reason}" if reason else ""
                self.warn(f"parameter {key!r} is not implemented by epp and is ignored{why}")

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self._read.add(key)
        value = self._raw.get(key, _MISSING)
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"parameter {key!r} must be {kind_name}, got {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"parameter {key!r} must be {kind_name}, got {value!r}")
        return value

    def get_int(self, key: str, default: int, minimum: int | None = None) -> int:
        value: int = self._get(key, default, (int,), "an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {key!r} must be >= {minimum}, got {value}")
        return value

    def get_float(
        self, key: str, default: float, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        value = float(self._get(key, default, (int, float), "a number"))
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {key!r} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"parameter {key!r} must be <= {maximum}, got {value}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def get_str(self, key: str, default: str, choices: Collection[str] | None = None) -> str:
        value: str = self._get(key, default, (str,), "a string")
        if choices is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"parameter {key!r} must be one of {options}, got {value!r}")
        return value

    def get_str_list(self, key: str) -> list[str]:
        value = self._get(key, [], (list,), "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"parameter {key!r} must be a list of strings, got {value!r}")
        return list(value)

    def get_list(self, key: str) -> list[Any]:
        value: list[Any] = self._get(key, [], (list,), "a list")
        return value

    def get_mapping(self, key: str) -> Mapping[str, Any]:
        value: Mapping[str, Any] = self._get(key, {}, (dict,), "a mapping")
        return value

    def sub(self, key: str) -> Params:
        """A nested mapping as Params of its own (its keys are checked the same way)."""
        nested = Params(self.get_mapping(key), f"{self._plugin}.{key}")
        nested.warnings = self.warnings  # one list: the loader reports them all
        self._children[key] = nested
        return nested
