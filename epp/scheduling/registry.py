"""Plugin registry: kebab-case type name -> factory. In-tree plugins are registered in one place
(`builtin_registry`); third-party ones arrive through the entry-point group `epp.plugins`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

from epp.framework import (
    DEFAULT_INFLIGHT_PRODUCER,
    DEFAULT_PREFIX_PRODUCER,
    INFLIGHT_LOAD_DATA,
    PREFIX_MATCH_DATA,
    ConfigError,
    Params,
    data_key,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"

# factory(name, params) -> plugin instance. A plugin class with a `type_name` attribute and an
# `__init__(self, name, params)` is such a factory.
PluginFactory = Callable[[str, Params], Any]


class PluginRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, PluginFactory] = {}
        self._default_producers: dict[str, str] = {}  # data key -> producer type
        self._deprecated: dict[str, str] = {}  # type -> what to use instead

    def register(self, type_name: str, factory: PluginFactory) -> None:
        if type_name in self._factories and self._factories[type_name] is not factory:
            raise ConfigError(f"plugin type {type_name!r} is registered twice")
        self._factories[type_name] = factory

    def register_class(self, cls: Any) -> None:
        type_name = getattr(cls, "type_name", None)
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{cls!r} has no `type_name` string to register it under")
        self.register(type_name, cls)

    def register_default_producer(self, key: str, type_name: str) -> None:
        """Type of the producer the loader adds (with default parameters, named after its type)
        when a plugin consumes `key` and no configured plugin produces it."""
        self._default_producers[key] = type_name

    def default_producer(self, key: str) -> str | None:
        return self._default_producers.get(key)

    def deprecate(self, type_name: str, replacement: str) -> None:
        self._deprecated[type_name] = replacement

    def deprecation(self, type_name: str) -> str | None:
        return self._deprecated.get(type_name)

    def types(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, type_name: str) -> bool:
        return type_name in self._factories

    def create(self, type_name: str, name: str, params: Params) -> Any:
        factory = self._factories.get(type_name)
        if factory is None:
            raise ConfigError(f"unknown plugin type {type_name!r} (known: {', '.join(self.types())})")
        return factory(name, params)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register third-party plugins. An entry point names a plugin class (with `type_name`)
        or a function taking the registry."""
        for ep in entry_points(group=group):
            try:
                target = ep.load()
            except Exception as exc:  # a broken third-party package must not stop epp
                log.error("cannot load plugin entry point %s (%s): %s", ep.name, ep.value, exc)
                continue
            type_name = getattr(target, "type_name", None)
            if isinstance(type_name, str):
                if type_name != ep.name:
                    log.warning(
                        "plugin entry point %s registers type %r: configs must use the type name",
                        ep.name,
                        type_name,
                    )
                try:
                    self.register_class(target)
                except ConfigError as exc:
                    log.error("plugin entry point %s (%s): %s", ep.name, ep.value, exc)
            elif callable(target):
                target(self)
            else:
                log.error("plugin entry point %s is neither a plugin class nor a register function", ep.name)


def builtin_registry(classes: Iterable[Any] | None = None) -> PluginRegistry:
    """Every in-tree plugin, registered explicitly. `classes` replaces the set (for tests)."""
    from epp.scheduling.compat import ALL_NATIVE_EQUIVALENTS
    from epp.scheduling.disagg import ALL_DISAGG_PLUGINS, DEPRECATED_DISAGG_PLUGINS
    from epp.scheduling.filters import ALL_FILTERS, DEPRECATED_FILTERS
    from epp.scheduling.pickers import ALL_PICKERS
    from epp.scheduling.profile_handlers import ALL_PROFILE_HANDLERS
    from scorers import ALL_PRODUCERS, ALL_SCORERS

    registry = PluginRegistry()
    if classes is not None:
        for cls in classes:
            registry.register_class(cls)
        return registry
    for cls in (
        *ALL_SCORERS,
        *ALL_PRODUCERS,
        *ALL_FILTERS,
        *ALL_PICKERS,
        *ALL_PROFILE_HANDLERS,
        *ALL_DISAGG_PLUGINS,
    ):
        registry.register_class(cls)
    for cls, replacement in (*DEPRECATED_FILTERS, *DEPRECATED_DISAGG_PLUGINS):
        registry.register_class(cls)
        registry.deprecate(cls.type_name, replacement)
    for type_name, factory in ALL_NATIVE_EQUIVALENTS.items():
        registry.register(type_name, factory)
    registry.register_default_producer(
        data_key(PREFIX_MATCH_DATA, DEFAULT_PREFIX_PRODUCER), DEFAULT_PREFIX_PRODUCER
    )
    registry.register_default_producer(
        data_key(INFLIGHT_LOAD_DATA, DEFAULT_INFLIGHT_PRODUCER), DEFAULT_INFLIGHT_PRODUCER
    )
    return registry
