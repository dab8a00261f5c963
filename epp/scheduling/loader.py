"""EndpointPickerConfig loader: YAML -> plugin instances -> a Scheduler.

Follows the Go loader (llm-d-router `pkg/epp/config/loader`):
- `apiVersion: llm-d.ai/v1alpha1` (the older `inference.networking.x-k8s.io/v1alpha1` with a
  warning), `kind: EndpointPickerConfig`; fields are decoded strictly: an unknown field or plugin
  parameter is an error, a Go field that epp does not implement is a warning;
- unknown plugin types, duplicate names and dangling references are errors;
- a plugin's name defaults to its type; a scorer without a weight gets 1;
- no `schedulingProfiles`: one profile `default` with every filter, scorer and picker;
- a profile without a picker gets the config's (first) picker, else `max-score-picker`;
- one profile and no handler: `single-profile-handler`;
- a plugin that names other plugins or profiles (a P/D profile handler naming its decider) has
  them resolved once every plugin exists; a dangling name is an error;
- a plugin that consumes data no configured plugin produces gets that data's default producer
  (e.g. `prefix-cache-scorer` -> `approx-prefix-cache-producer`), named after its type.
epp adds one rule of its own: a scorer that no profile uses is an error (it would do nothing).
Every message names the source, the plugin and the problem.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from epp.framework import (
    ConfigError,
    DataProducer,
    Filter,
    Params,
    Picker,
    Plugin,
    PluginHandle,
    PluginRegistry,
    ProfileHandler,
    Scorer,
)
from epp.scheduling.profile import PluginTimer, SchedulerProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

API_VERSION = "llm-d.ai/v1alpha1"
LEGACY_API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1",)
KIND = "EndpointPickerConfig"
DEFAULT_PROFILE = "default"
# What the loader adds when a config names none (by type name, through the registry, as Go does).
DEFAULT_PICKER_TYPE = "max-score-picker"
DEFAULT_PROFILE_HANDLER_TYPE = "single-profile-handler"
DEFAULT_SCORER_WEIGHT = 1.0

DEFAULT_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

_IMPLEMENTED_FIELDS = ("apiVersion", "kind", "plugins", "schedulingProfiles")
# Go EPP fields that epp accepts and ignores, and why.
_UNIMPLEMENTED_FIELDS = {
    "featureGates": "no feature gates",
    "dataLayer": "epp scrapes metrics itself",
    "flowControl": "no flow control or saturation-based admission",
    "saturationDetector": "no saturation-based admission",
    "requestHandler": "epp parses the OpenAI API itself",
    "parser": "epp parses the OpenAI API itself",
}
_PLUGIN_FIELDS = ("type", "name", "parameters")
_PROFILE_FIELDS = ("name", "plugins")
_REF_FIELDS = ("pluginRef", "weight")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; Go's decoder, which
    the config format comes from, reads it as a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class LoadedConfig:
    scheduler: Scheduler
    handle: PluginHandle
    warnings: list[str] = field(default_factory=list)
    # Plugins the loader added: default producers, picker, profile handler (by name).
    implicit_plugins: list[str] = field(default_factory=list)


class _Loader:
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
        self.types: dict[str, str] = {}

    # --- messages --------------------------------------------------------------------------------

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.source}: {message}")

    def _check_fields(self, spec: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in spec:
            if key not in allowed:
                raise self.error(f"{where}: unknown field {key!r} (allowed: {', '.join(allowed)})")

    # --- document --------------------------------------------------------------------------------

    def document(self, text: str) -> dict[str, Any]:
        try:
            doc = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise self.error(f"not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(doc, dict):
            raise self.error("must be a YAML mapping with kind EndpointPickerConfig")
        api_version = doc.get("apiVersion")
        if api_version in LEGACY_API_VERSIONS:
            self.warn(f"apiVersion {api_version} is deprecated; use {API_VERSION}")
        elif api_version != API_VERSION:
            raise self.error(f"apiVersion must be {API_VERSION}, got {api_version!r}")
        if doc.get("kind") != KIND:
            raise self.error(f"kind must be {KIND}, got {doc.get('kind')!r}")
        for key in doc:
            if key in _IMPLEMENTED_FIELDS:
                continue
            reason = _UNIMPLEMENTED_FIELDS.get(key)
            if reason is None:
                known = ", ".join((*_IMPLEMENTED_FIELDS, *_UNIMPLEMENTED_FIELDS))
                raise self.error(f"unknown field {key!r} (known: {known})")
            self.warn(f"field {key!r} is not implemented by epp and is ignored ({reason})")
        return doc

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

    def plugins(self, specs: list[Any]) -> None:
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or not spec["type"]:
                raise self.error(f"plugins[{i}] needs a 'type' string")
            type_name = spec["type"]
            name = spec.get("name") or type_name
            if not isinstance(name, str):
                raise self.error(f"plugins[{i}] ({type_name}): name must be a string")
            self._check_fields(spec, _PLUGIN_FIELDS, f"plugin {name!r}")
            if name in self.instances:
                raise self.error(f"duplicate plugin name {name!r}")
            cls = self.registry.get(type_name)
            replacement = cls.deprecated_by if cls is not None else ""
            if replacement:
                self.warn(f"plugin {name!r}: type {type_name!r} is deprecated; use {replacement}")
            self.instances[name] = self._create(type_name, name, spec.get("parameters"))
            self.types[name] = type_name

    def bind_references(self, profile_specs: list[Any]) -> None:
        """Let plugins that name other plugins or profiles (a P/D handler naming its decider)
        resolve them, before default producers are added for what they consume."""
        names = [p["name"] for p in profile_specs if isinstance(p, dict) and isinstance(p.get("name"), str)]
        self.handle.plugins = self.instances
        self.handle.profile_names = names or [DEFAULT_PROFILE]
        for name, plugin in list(self.instances.items()):
            where = f"plugin {name!r} ({self.types[name]})"
            try:
                remarks = plugin.bind(self.handle)
            except ConfigError as exc:
                raise self.error(f"{where}: {exc}") from None
            for remark in remarks:
                self.warn(f"{where}: {remark}")

    def default_producers(self) -> None:
        """Add the default producer of every data key a plugin consumes and nothing produces."""
        produced = {
            key for p in self.instances.values() if isinstance(p, DataProducer) for key in p.produces()
        }
        for name, plugin in list(self.instances.items()):
            for key in plugin.consumes():
                # Older configs put the default producer's parameters on its consumer.
                carried = plugin.producer_parameters(key)
                if key in produced:
                    if carried:
                        self.warn(
                            f"plugin {name!r}: parameters {', '.join(sorted(carried))} belong to the "
                            f"producer of {str(key)!r}, which the config declares; they are ignored here"
                        )
                    continue
                type_name = self.registry.default_producer(key)
                if type_name is None:
                    raise self.error(
                        f"plugin {name!r} needs data {str(key)!r}, which no configured plugin produces"
                    )
                if type_name in self.instances:
                    raise self.error(
                        f"plugin {name!r} needs data {str(key)!r} from a {type_name} named {type_name!r}, "
                        f"but that name is taken by a plugin of type {self.types[type_name]!r}"
                    )
                if carried:
                    self.warn(
                        f"plugin {name!r}: parameters {', '.join(sorted(carried))} belong to {type_name} "
                        "(older config layout); they configure the producer epp adds for it"
                    )
                producer = self._create(
                    type_name,
                    type_name,
                    dict(carried) if carried else None,
                    where=f"plugin {name!r} (parameters for the {type_name} it needs)" if carried else "",
                )
                self.instances[type_name] = producer
                self.types[type_name] = type_name
                self.implicit.append(type_name)
                if isinstance(producer, DataProducer):
                    produced.update(producer.produces())
                log.debug("%s: added plugin %r, which %r needs", self.source, type_name, name)

    # --- profiles --------------------------------------------------------------------------------

    def _weight(self, ref: Mapping[str, Any], pname: str, pref: str) -> float | None:
        weight = ref.get("weight")
        if weight is None:
            return None
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise self.error(f"profile {pname!r}: plugin {pref!r}: weight must be a number, got {weight!r}")
        return float(weight)

    def profiles(self, specs: list[Any]) -> dict[str, SchedulerProfile]:
        if not specs:
            # Go: one profile `default` holding every filter, scorer and picker.
            refs = [
                {"pluginRef": name}
                for name, p in self.instances.items()
                if isinstance(p, Filter | Scorer | Picker)
            ]
            specs = [{"name": DEFAULT_PROFILE, "plugins": refs}]
        default_picker: Picker | None = next(
            (p for p in self.instances.values() if isinstance(p, Picker)), None
        )
        profiles: dict[str, SchedulerProfile] = {}
        self.referenced: set[str] = set()
        for i, pspec in enumerate(specs):
            if not isinstance(pspec, dict) or not isinstance(pspec.get("name"), str) or not pspec["name"]:
                raise self.error(f"schedulingProfiles[{i}] needs a 'name' string")
            pname = pspec["name"]
            self._check_fields(pspec, _PROFILE_FIELDS, f"profile {pname!r}")
            if pname in profiles:
                raise self.error(f"duplicate profile name {pname!r}")
            filters: list[Filter] = []
            scorers: list[WeightedScorer] = []
            picker: Picker | None = None
            seen: set[str] = set()
            for j, ref in enumerate(self._list(pspec.get("plugins"), f"profile {pname!r} plugins")):
                if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
                    raise self.error(f"profile {pname!r} plugins[{j}] needs a 'pluginRef' string")
                pref = ref["pluginRef"]
                self._check_fields(ref, _REF_FIELDS, f"profile {pname!r} plugin {pref!r}")
                plugin = self.instances.get(pref)
                if plugin is None:
                    raise self.error(f"profile {pname!r} references undefined plugin {pref!r}")
                if pref in seen:
                    raise self.error(f"profile {pname!r} lists plugin {pref!r} twice")
                seen.add(pref)
                self.referenced.add(pref)
                weight = self._weight(ref, pname, pref)
                placed = False
                if isinstance(plugin, Filter):
                    filters.append(plugin)
                    placed = True
                if isinstance(plugin, Scorer):
                    scorers.append(
                        WeightedScorer(plugin, DEFAULT_SCORER_WEIGHT if weight is None else weight)
                    )
                    placed = True
                elif weight is not None:
                    self.warn(f"profile {pname!r}: plugin {pref!r} is not a scorer; its weight is ignored")
                if isinstance(plugin, Picker):
                    if picker is not None:
                        raise self.error(f"profile {pname!r} has more than one picker ({pref!r})")
                    picker = plugin
                    placed = True
                if not placed:
                    self.warn(
                        f"profile {pname!r}: plugin {pref!r} ({self.types[pref]}) is not a filter, scorer "
                        "or picker; listing it in a profile has no effect"
                    )
            if picker is None:
                if default_picker is None:
                    default_picker = self._implicit(DEFAULT_PICKER_TYPE, Picker)
                picker = default_picker
            profiles[pname] = SchedulerProfile(pname, filters, scorers, picker, timer=self.timer)
        return profiles

    def unused(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        used_pickers = {id(p.picker) for p in profiles.values()}
        for name, plugin in self.instances.items():
            if name in self.referenced:
                continue
            if isinstance(plugin, Scorer):
                raise self.error(
                    f"plugin {name!r} ({self.types.get(name, plugin.type_name)}) is a scorer but no "
                    "profile uses it; add it to a schedulingProfiles entry with a weight, or remove it"
                )
            if isinstance(plugin, Filter):
                self.warn(f"plugin {name!r} is a filter but no profile uses it")
            elif isinstance(plugin, Picker) and id(plugin) not in used_pickers:
                self.warn(f"plugin {name!r} is a picker but no profile uses it")

    def handler(self, profiles: Mapping[str, SchedulerProfile]) -> ProfileHandler:
        handlers = [(n, p) for n, p in self.instances.items() if isinstance(p, ProfileHandler)]
        if len(handlers) > 1:
            first, second = handlers[0][0], handlers[1][0]
            raise self.error(f"more than one profile handler is defined ({first!r}, {second!r})")
        if handlers:
            name, handler = handlers[0]
            limit = handler.max_profiles
            if limit is not None and len(profiles) > limit:
                raise self.error(f"plugin {name!r} ({handler.type_name}) cannot run {len(profiles)} profiles")
            return handler
        if len(profiles) == 1:
            return self._implicit(DEFAULT_PROFILE_HANDLER_TYPE, ProfileHandler)
        raise self.error(
            f"{len(profiles)} profiles need a profile handler plugin (for prefill/decode "
            "disaggregation: disagg-profile-handler with profiles decode and prefill)"
        )

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


K = TypeVar("K", bound=Plugin)


def load_config(
    text: str,
    registry: PluginRegistry,
    source: str = "config",
    timer: PluginTimer | None = None,
    handle: PluginHandle | None = None,
) -> LoadedConfig:
    """Build the scheduler a config describes. Raises ConfigError naming source, plugin, problem.
    `handle` gives the plugins their metrics registry and in-flight ledger (a fresh one if None)."""
    handle = handle or PluginHandle()
    loader = _Loader(registry, source, timer, handle)
    doc = loader.document(text)
    loader.plugins(loader._list(doc.get("plugins"), "plugins"))
    profile_specs = loader._list(doc.get("schedulingProfiles"), "schedulingProfiles")
    loader.bind_references(profile_specs)
    loader.default_producers()
    profiles = loader.profiles(profile_specs)
    loader.unused(profiles)
    handler = loader.handler(profiles)
    for warning in loader.warnings:
        log.warning("%s", warning)
    scheduler = Scheduler(handler, profiles, list(loader.instances.values()), timer, handle)
    return LoadedConfig(scheduler, handle, loader.warnings, loader.implicit)
