"""What every section of the EndpointPickerConfig loader (`epp.scheduling.loader`) shares: the
loader's state, its messages (each names the config's source), strict decoding of nested objects
and plugin references, the Go decoder's quantities and durations, and making plugins (their
parameters read strictly; the ones the loader adds itself, named after their type)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from epp.framework import ConfigError, Params, Plugin, PluginHandle, PluginRegistry
from epp.scheduling.profile import PluginTimer

_PLUGIN_REF_FIELDS = ("pluginRef",)

# The feature gates the Go EPP registers (llm-d-router cmd/epp/runner), with their defaults.
FLOW_CONTROL_GATE = "flowControl"
FEATURE_GATES = {FLOW_CONTROL_GATE: False, "haPopulateNonLeaderDatastore": True}

# Kubernetes quantities ("10Gi", "1k", "500") and Go durations ("60s", "1m30s"), as the Go
# decoder accepts them.
_QUANTITY = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
_DURATION = re.compile(r"^[+-]?(?:0|(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+)$")

K = TypeVar("K", bound=Plugin)


class ConfigReader:
    """The loader's state and what its sections share; the sections (`FlowControlSection`,
    `DataLayerSection`) and the loader derive from it."""

    def __init__(
        self, registry: PluginRegistry, source: str, timer: PluginTimer | None, handle: PluginHandle
    ) -> None:
        self.registry = registry
        self.source = source
        self.timer = timer
        self.handle = handle
        self.warnings: list[str] = []
        self.implicit: list[str] = []
        self.instances: dict[str, Plugin] = {}
        self.referenced: set[str] = set()  # plugins a profile or the flowControl section uses
        self.types: dict[str, str] = {}
        self.gates: dict[str, bool] = dict(FEATURE_GATES)

    # --- messages --------------------------------------------------------------------------------

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.source}: {message}")

    def _check_fields(self, spec: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in spec:
            if key not in allowed:
                raise self.error(f"{where}: unknown field {key!r} (allowed: {', '.join(allowed)})")

    def _mapping(self, value: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
        """A nested object of the config, decoded strictly (None: absent, an empty mapping)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(f"{where} must be a mapping, got {value!r}")
        self._check_fields(value, allowed, where)
        return value

    def _ref(self, value: Any, where: str, required: bool = True) -> str:
        spec = self._mapping(value, _PLUGIN_REF_FIELDS, where)
        ref = spec.get("pluginRef")
        if ref is None and not required:
            return ""
        if not isinstance(ref, str) or (required and not ref):
            raise self.error(f"{where} needs a 'pluginRef' string")
        return ref

    def _describe(self, name: str) -> str:
        return f"plugin {name!r} ({self.types.get(name, '?')})"

    def _list(self, value: Any, what: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"{what} must be a list")
        return value

    # --- plugins ---------------------------------------------------------------------------------

    def _create(self, type_name: str, name: str, raw: Any, where: str = "") -> Plugin:
        where = where or f"plugin {name!r} ({type_name})"
        cls = self.registry.get(type_name)
        if cls is None:
            known = ", ".join(self.registry.types())
            raise self.error(f"plugin {name!r}: unknown plugin type {type_name!r} (known: {known})")
        try:
            params = Params(raw, name)
            plugin = cls.from_params(name, params, self.handle)
        except ConfigError as exc:
            raise self.error(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise self.error(f"{where}: bad parameters: {exc}") from None
        unread = params.unread()
        if unread:
            raise self.error(f"{where}: unknown parameter {unread[0]!r}")
        for message in params.warnings:
            self.warn(f"{where}: {message}")
        return plugin

    def _implicit(self, type_name: str, kind: type[K]) -> K:
        """A plugin the loader adds with default parameters, named after its type."""
        existing = self.instances.get(type_name)
        if isinstance(existing, kind):
            return existing
        plugin = self._create(type_name, type_name, None, where=f"the {type_name} epp adds")
        if not isinstance(plugin, kind):
            raise self.error(f"plugin type {type_name!r} is not a {kind.__name__}")
        self.instances.setdefault(type_name, plugin)
        self.implicit.append(type_name)
        return plugin

    # --- the Go decoder's field types --------------------------------------------------------------

    def _quantity(self, value: Any, where: str) -> None:
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            return
        if not isinstance(value, str) or not _QUANTITY.match(value.strip()):
            raise self.error(f"{where} must be a quantity (e.g. 500, 1k, 10Gi), got {value!r}")

    def _duration(self, value: Any, where: str) -> None:
        if value is not None and (not isinstance(value, str) or not _DURATION.match(value.strip())):
            raise self.error(f"{where} must be a duration (e.g. 60s, 1m30s), got {value!r}")
