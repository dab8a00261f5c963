"""Plugin registry: kebab-case type name -> factory. In-tree plugins are registered in one place;
third-party ones arrive through the entry-point group `epp.plugins`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

from epp.framework import ConfigError, Params

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epp.plugins"

# factory(name, params) -> plugin instance. A plugin class with a `type_name` attribute and an
# `__init__(self, name, params)` is such a factory.
PluginFactory = Callable[[str, Params], Any]


class PluginRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, PluginFactory] = {}

    def register(self, type_name: str, factory: PluginFactory) -> None:
        if type_name in self._factories and self._factories[type_name] is not factory:
            raise ConfigError(f"plugin type {type_name!r} is registered twice")
        self._factories[type_name] = factory

    def register_class(self, cls: Any) -> None:
        type_name = getattr(cls, "type_name", None)
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{cls!r} has no `type_name` string to register it under")
        self.register(type_name, cls)

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
            if isinstance(getattr(target, "type_name", None), str):
                self.register_class(target)
            elif callable(target):
                target(self)
            else:
                log.error("plugin entry point %s is neither a plugin class nor a register function", ep.name)


def builtin_registry(classes: Iterable[Any] | None = None) -> PluginRegistry:
    """Every in-tree plugin, registered explicitly."""
    from epp.scheduling.pickers import ALL_PICKERS
    from epp.scheduling.profile_handlers import ALL_PROFILE_HANDLERS
    from scorers import ALL_SCORERS

    registry = PluginRegistry()
    for cls in classes if classes is not None else (*ALL_SCORERS, *ALL_PICKERS, *ALL_PROFILE_HANDLERS):
        registry.register_class(cls)
    return registry
