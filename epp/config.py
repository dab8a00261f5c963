"""EndpointPickerConfig loader: YAML -> plugin instances -> a Scheduler.

Follows the Go loader: unknown types, duplicate names and dangling references are errors; a scorer
without a weight gets 1; a profile without a picker gets `max-score-picker`; one profile and no
handler gets `single-profile-handler`. Every message names the source and the plugin.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.framework import ConfigError, Filter, Params, Picker, ProfileHandler, Scorer
from epp.scheduling.pickers import MaxScorePicker
from epp.scheduling.profile import PluginTimer, SchedulerProfile, WeightedScorer
from epp.scheduling.profile_handlers import SingleProfileHandler
from epp.scheduling.registry import PluginRegistry
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

API_VERSION = "llm-d.ai/v1alpha1"
LEGACY_API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1",)
KIND = "EndpointPickerConfig"

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

_TOP_LEVEL_KEYS = {"apiVersion", "kind", "plugins", "schedulingProfiles"}


@dataclass
class LoadedConfig:
    scheduler: Scheduler
    warnings: list[str] = field(default_factory=list)


def _err(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _as_list(value: Any, what: str, source: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(source, f"{what} must be a list")
    return value


def _weight(ref: Mapping[str, Any], plugin: str, source: str) -> float | None:
    if "weight" not in ref or ref["weight"] is None:
        return None
    weight = ref["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise _err(source, f"plugin {plugin!r}: weight must be a number, got {weight!r}")
    if weight < 0:
        raise _err(source, f"plugin {plugin!r}: weight must not be negative, got {weight}")
    return float(weight)


def load_config(
    text: str, registry: PluginRegistry, source: str = "config", timer: PluginTimer | None = None
) -> LoadedConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _err(source, f"not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(doc, dict):
        raise _err(source, "must be a YAML mapping with kind EndpointPickerConfig")
    warnings: list[str] = []
    api_version = doc.get("apiVersion")
    if api_version in LEGACY_API_VERSIONS:
        warnings.append(f"{source}: apiVersion {api_version} is deprecated; use {API_VERSION}")
    elif api_version != API_VERSION:
        raise _err(source, f"apiVersion must be {API_VERSION}, got {api_version!r}")
    if doc.get("kind") != KIND:
        raise _err(source, f"kind must be {KIND}, got {doc.get('kind')!r}")
    for key in sorted(set(doc) - _TOP_LEVEL_KEYS):
        warnings.append(f"{source}: field {key!r} is not implemented by epp and is ignored")

    instances: dict[str, Any] = {}
    for i, spec in enumerate(_as_list(doc.get("plugins"), "plugins", source)):
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise _err(source, f"plugins[{i}] needs a 'type' string")
        type_name = spec["type"]
        name = spec.get("name") or type_name
        if not isinstance(name, str):
            raise _err(source, f"plugins[{i}] ({type_name}): name must be a string")
        if name in instances:
            raise _err(source, f"duplicate plugin name {name!r}")
        for key in sorted(set(spec) - {"type", "name", "parameters"}):
            warnings.append(f"{source}: plugin {name!r}: field {key!r} is not implemented and is ignored")
        try:
            instances[name] = registry.create(type_name, name, Params(spec.get("parameters"), name))
        except ConfigError as exc:
            raise _err(source, f"plugin {name!r}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise _err(source, f"plugin {name!r} ({type_name}): bad parameters: {exc}") from None

    profile_specs = _as_list(doc.get("schedulingProfiles"), "schedulingProfiles", source)
    if not profile_specs:
        raise _err(source, "schedulingProfiles must name at least one profile")
    profiles: dict[str, SchedulerProfile] = {}
    referenced: set[str] = set()
    for i, pspec in enumerate(profile_specs):
        if not isinstance(pspec, dict) or not isinstance(pspec.get("name"), str):
            raise _err(source, f"schedulingProfiles[{i}] needs a 'name' string")
        pname = pspec["name"]
        if pname in profiles:
            raise _err(source, f"duplicate profile name {pname!r}")
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        picker: Picker | None = None
        for j, ref in enumerate(_as_list(pspec.get("plugins"), f"profile {pname!r} plugins", source)):
            if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
                raise _err(source, f"profile {pname!r} plugins[{j}] needs a 'pluginRef' string")
            pref = ref["pluginRef"]
            plugin = instances.get(pref)
            if plugin is None:
                raise _err(source, f"profile {pname!r} references undefined plugin {pref!r}")
            referenced.add(pref)
            weight = _weight(ref, pref, source)
            placed = False
            if isinstance(plugin, Filter):
                filters.append(plugin)
                placed = True
            if isinstance(plugin, Scorer):
                scorers.append(WeightedScorer(plugin, 1.0 if weight is None else weight))
                placed = True
            elif weight is not None:
                warnings.append(
                    f"{source}: profile {pname!r}: plugin {pref!r} is not a scorer; weight ignored"
                )
            if isinstance(plugin, Picker):
                if picker is not None:
                    raise _err(source, f"profile {pname!r} has more than one picker")
                picker = plugin
                placed = True
            if not placed:
                raise _err(source, f"profile {pname!r}: plugin {pref!r} is not a filter, scorer or picker")
        profiles[pname] = SchedulerProfile(pname, filters, scorers, picker or MaxScorePicker(), timer=timer)

    handlers = [p for p in instances.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise _err(source, "more than one profile handler is defined")
    handler: ProfileHandler
    if handlers:
        handler = handlers[0]
    elif len(profiles) == 1:
        handler = SingleProfileHandler()
    else:
        raise _err(source, "several profiles need a profile handler plugin (e.g. disagg-profile-handler)")
    for name, plugin in instances.items():
        if name not in referenced and isinstance(plugin, Scorer | Filter | Picker):
            raise _err(source, f"plugin {name!r} is defined but no profile uses it")
    for w in warnings:
        log.warning("%s", w)
    return LoadedConfig(Scheduler(handler, profiles, plugins=list(instances.values())), warnings)
