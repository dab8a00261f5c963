"""Plugin registry: kebab-case type name -> plugin class.

Every plugin package, the in-tree `epp_scorers` included, is found through the entry-point group
`epp.plugins`. An entry point names either a register function `register(registry)` (a package
with several plugins) or one plugin class with a `type_name`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from epp.errors import ConfigError
from epp.framework.cycle import DataKey
from epp.framework.params import Params
from epp.framework.plugin import (
    EndpointListener,
    Filter,
    Picker,
    Plugin,
    PreRequest,
    ResponseComplete,
    ResponseHeaders,
    Scorer,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"


class PluginRegistry:
    def __init__(self) -> None:
        self._classes: dict[str, type[Plugin]] = {}
        self._default_producers: dict[DataKey[Any], str] = {}  # data key -> producer type

    def register(self, cls: type[Any]) -> None:
        """Register a plugin class (a `Plugin` subclass; an older duck-typed class is adapted)."""
        type_name = getattr(cls, "type_name", None)
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{cls!r} has no `type_name` string to register it under")
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            cls = _legacy_adapter(cls)
        current = self._classes.get(type_name)
        if current is not None and current is not cls:
            raise ConfigError(f"plugin type {type_name!r} is registered twice")
        self._classes[type_name] = cls

    def register_default_producer(self, key: DataKey[Any], type_name: str) -> None:
        """Type of the producer the loader adds (with default parameters, named after its type)
        when a plugin consumes `key` and no configured plugin produces it."""
        self._default_producers[key] = type_name

    def default_producer(self, key: DataKey[Any]) -> str | None:
        return self._default_producers.get(key)

    def types(self) -> list[str]:
        return sorted(self._classes)

    def get(self, type_name: str) -> type[Plugin] | None:
        return self._classes.get(type_name)

    def __contains__(self, type_name: str) -> bool:
        return type_name in self._classes

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register every installed plugin package. A broken third-party package is logged and
        skipped: it must not stop epp."""
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            try:
                target = ep.load()
            except Exception as exc:
                log.error("cannot load plugin entry point %s (%s): %s", ep.name, ep.value, exc)
                continue
            try:
                if isinstance(target, type):
                    type_name = getattr(target, "type_name", ep.name)
                    if type_name != ep.name:
                        log.warning(
                            "plugin entry point %s registers type %r: configs must use the type name",
                            ep.name,
                            type_name,
                        )
                    self.register(target)
                elif callable(target):
                    target(self)
                else:
                    log.error(
                        "plugin entry point %s is neither a plugin class nor a register function", ep.name
                    )
            except ConfigError as exc:
                log.error("plugin entry point %s (%s): %s", ep.name, ep.value, exc)
            except Exception as exc:  # a bug in a third-party register function
                log.error(
                    "plugin entry point %s (%s) failed to register: %s: %s",
                    ep.name,
                    ep.value,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )


def installed_registry() -> PluginRegistry:
    """Every plugin installed through the `epp.plugins` entry points (the in-tree ones included)."""
    registry = PluginRegistry()
    registry.load_entry_points()
    return registry


# Methods an old-style plugin may have -> the base class that declares them now.
_LEGACY_KINDS: tuple[tuple[str, type[Plugin]], ...] = (
    ("filter", Filter),
    ("score", Scorer),
    ("pick", Picker),
    ("pre_request", PreRequest),
    ("response_headers", ResponseHeaders),
    ("response_complete", ResponseComplete),
    ("endpoint_removed", EndpointListener),
)


def _legacy_adapter(cls: Any) -> type[Plugin]:
    """A class written before the plugin bases existed: `type_name`, `__init__(name, params)` and
    duck-typed methods (`score`, `filter`, `pick`, lifecycle hooks, `consumes`). Wrapped in a class
    deriving from the matching bases, each method forwarded, so that it keeps working; a warning
    asks its author to derive from the bases."""
    found = [(m, base) for m, base in _LEGACY_KINDS if callable(getattr(cls, m, None))]
    if not any(base in (Filter, Scorer, Picker) for _, base in found):
        raise ConfigError(f"{cls!r} is not a Plugin subclass and has no score, filter or pick method")
    log.warning(
        "plugin %s (%s) does not derive from the epp.framework plugin bases (%s); it is adapted, "
        "but please derive from them",
        cls.type_name,
        cls.__qualname__,
        ", ".join(base.__name__ for _, base in found),
    )
    build: Callable[[str, Params], Any] = cls

    def from_params(adapter: type[Any], name: str, params: Params, handle: object) -> Any:
        plugin = adapter(name)
        plugin.inner = build(name, params)
        return plugin

    def forward(method: str) -> Callable[..., Any]:
        def call(self: Any, *args: Any) -> Any:
            return getattr(self.inner, method)(*args)

        call.__name__ = method
        return call

    def consumes(self: Any) -> tuple[DataKey[Any], ...]:
        # Old plugins named data keys as "kind/producer" strings.
        keys = getattr(self.inner, "consumes", lambda: ())()
        return tuple(k if isinstance(k, DataKey) else DataKey(*str(k).partition("/")[::2]) for k in keys)

    namespace: dict[str, Any] = {m: forward(m) for m, _ in found}
    namespace.update(
        type_name=cls.type_name,
        __doc__=cls.__doc__,
        __module__=cls.__module__,
        from_params=classmethod(from_params),
        consumes=consumes,
    )
    return type(cls.__name__, tuple(base for _, base in found), namespace)
