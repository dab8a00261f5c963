"""EndpointPickerConfig loader: YAML -> plugin instances -> a Scheduler.

Follows the Go loader (llm-d-router `pkg/epp/config/loader`):
- `apiVersion: llm-d.ai/v1alpha1` or `llm-d.ai/v1` (the older
  `inference.networking.x-k8s.io/v1alpha1` with a warning), `kind: EndpointPickerConfig`; fields
  are decoded strictly: an unknown field or plugin parameter is an error, a Go setting that epp
  does not implement is a warning;
- plugin types epp does not have are reported first, all of them in one message (before any
  apiVersion or parameter error), so a config written for the Go EPP says at once what is
  missing; duplicate names and dangling references are errors;
- a plugin's name defaults to its type; a scorer without a weight gets 1;
- no `schedulingProfiles`: one profile `default` with every filter, scorer and picker;
- a profile without a picker gets the config's (first) picker, else `max-score-picker`;
- one profile and no handler: `single-profile-handler`;
- a plugin that names other plugins or profiles (a P/D profile handler naming its decider) has
  them resolved once every plugin exists; a dangling name is an error;
- a plugin that consumes data no configured plugin produces gets that data's default producer
  (e.g. `prefix-cache-scorer` -> `approx-prefix-cache-producer`), named after its type;
- a scorer that no profile uses is loaded and reported with a warning (it does nothing);
- `requestHandler.parsers` (and the deprecated top-level `parser`) must name parser plugins; a
  parser type named but not declared is added, as Go adds it;
- `flowControl.saturationDetector` (and the deprecated top-level `saturationDetector`) must name a
  saturation detector; with the `flowControl` feature gate on, the `flowControl` section is
  read (`epp.flowcontrol.config`) and its policy references must name policies (an empty one is
  the default policy, added as Go adds it); admitter plugins are collected;
- `dataLayer` wires data sources to extractors as in Go; epp scrapes with the
  `metrics-data-source` and `core-metrics-extractor` it selects (`LoadedConfig.data_layer`).
Every message names the source, the plugin and the problem.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.flowcontrol.config import FlowControlConfig
from epp.framework import (
    Admitter,
    ConfigError,
    DataProducer,
    Filter,
    Parser,
    Picker,
    Plugin,
    PluginHandle,
    PluginRegistry,
    ProfileHandler,
    SaturationDetector,
    Scorer,
)
from epp.scheduling.config_reader import FEATURE_GATES, FLOW_CONTROL_GATE
from epp.scheduling.data_layer_section import DataLayerSection, MetricsDataLayer
from epp.scheduling.flow_control_section import (
    DEFAULT_FLOW_CONTROL_POLICIES,
    DEFAULT_SATURATION_DETECTOR,
    FlowControlSection,
)
from epp.scheduling.profile import PluginTimer, SchedulerProfile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

API_VERSION = "llm-d.ai/v1alpha1"
API_VERSIONS = ("llm-d.ai/v1alpha1", "llm-d.ai/v1")
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

_TOP_FIELDS = (
    "apiVersion",
    "kind",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "dataLayer",
    "flowControl",
    "requestHandler",
    "saturationDetector",
    "parser",
)
_PLUGIN_FIELDS = ("type", "name", "parameters")
_PROFILE_FIELDS = ("name", "plugins")
_REF_FIELDS = ("pluginRef", "weight")
_REQUEST_HANDLER_FIELDS = ("parsers",)

_GO_TRUE = {"1", "t", "true"}
_GO_FALSE = {"0", "f", "false"}

# Go parser types: a parser reference that names one of these without declaring it makes the Go
# loader add it (registerDefaultPlugin), so epp reports the ones it does not have as missing.
GO_PARSER_TYPES = (
    "openai-parser",
    "anthropic-parser",
    "vllmhttp-parser",
    "vllmgrpc-parser",
    "sglanghttp-parser",
    "vertexai-parser",
    "passthrough-parser",
)


# prefix-cache-affinity-filter's default peakPrefillThroughput (tokens/s), to read the removed
# maxTokensInFlightPenalty.
_PEAK_PREFILL_DEFAULT = 15928.0


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; Go's decoder, which
    the config format comes from, reads it as a number. A key given twice in one mapping is an
    error, as in Go's strict decoder (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


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
    # Plugins the loader added: default producers, picker, profile handler, parsers (by name).
    implicit_plugins: list[str] = field(default_factory=list)
    data_layer: MetricsDataLayer = field(default_factory=MetricsDataLayer)
    # Flow control (None: the gate is off), the saturation detector, the admitter plugins.
    flow_control: FlowControlConfig | None = None
    saturation_detector: SaturationDetector | None = None
    admitters: list[Admitter] = field(default_factory=list)


def _as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _ref_of(value: Any) -> str:
    ref = _as_mapping(value).get("pluginRef")
    return ref if isinstance(ref, str) else ""


class _Loader(FlowControlSection, DataLayerSection):
    """The whole document: its fields and feature gates, the plugins, the profiles and their
    handler, request handling; flow control and the data layer are sections of their own
    (`epp.scheduling.flow_control_section`, `epp.scheduling.data_layer_section`), and what they
    all share is `epp.scheduling.config_reader`'s."""

    # --- document --------------------------------------------------------------------------------

    def read(self, text: str) -> dict[str, Any]:
        try:
            doc = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise self.error(f"not valid YAML: {exc}".replace("\n", " ")) from None
        if not isinstance(doc, dict):
            raise self.error("must be a YAML mapping with kind EndpointPickerConfig")
        return doc

    def missing_types(self, doc: Mapping[str, Any]) -> None:
        """Every plugin type the config needs and epp does not have, in one error, before anything
        else is checked: the declared plugins' types, and the types Go would add for a parser,
        saturation-detector or flow-control reference that names a type and declares no plugin."""
        missing: dict[str, None] = {}
        declared: set[str] = set()
        for spec in _as_list(doc.get("plugins")):
            type_name = _as_mapping(spec).get("type")
            if not isinstance(type_name, str) or not type_name:
                continue
            name = _as_mapping(spec).get("name") or type_name
            declared.add(name if isinstance(name, str) else type_name)
            if type_name not in self.registry:
                missing[type_name] = None
        refs: list[tuple[str, tuple[str, ...]]] = [
            (_ref_of(p), GO_PARSER_TYPES)
            for p in _as_list(_as_mapping(doc.get("requestHandler")).get("parsers"))
        ]
        if not refs:  # the deprecated fields count only when the new ones are not set, as in Go
            refs.append((_ref_of(doc.get("parser")), GO_PARSER_TYPES))
        flow = _as_mapping(doc.get("flowControl"))
        detector = flow.get("saturationDetector")
        if detector is None:
            detector = doc.get("saturationDetector")
        refs.append((_ref_of(detector), (DEFAULT_SATURATION_DETECTOR,)))
        if self._gate_on(doc.get("featureGates"), FLOW_CONTROL_GATE):
            for ref in self._policy_refs(flow).values():
                refs.append((ref, DEFAULT_FLOW_CONTROL_POLICIES))
        for ref, go_types in refs:
            if ref and ref not in declared and ref in go_types and ref not in self.registry:
                missing[ref] = None
        if not missing:
            return
        names = []
        for type_name in missing:
            close = difflib.get_close_matches(type_name, self.registry.types(), n=1, cutoff=0.85)
            names.append(f"{type_name} (did you mean {close[0]}?)" if close else type_name)
        raise self.error(
            f"plugin types epp does not have: {', '.join(names)} (docs/plugins.md lists the types epp has)"
        )

    @staticmethod
    def _gate_on(gates: Any, gate: str) -> bool:
        value = FEATURE_GATES.get(gate, False)
        for entry in _as_list(gates):
            if isinstance(entry, str):
                name, _, setting = entry.partition("=")
                if name.strip() == gate:
                    value = setting.strip().lower() not in _GO_FALSE if setting else True
        return value

    @staticmethod
    def _policy_refs(flow: Mapping[str, Any]) -> dict[str, str]:
        """The flow-control policy references, by where they are (non-empty strings only)."""
        refs: dict[str, str] = {}
        usage = flow.get("usageLimitPolicyPluginRef")
        if isinstance(usage, str) and usage:
            refs["flowControl.usageLimitPolicyPluginRef"] = usage
        bands: list[tuple[str, Any]] = [
            ("flowControl.defaultPriorityBand", flow.get("defaultPriorityBand")),
            ("flowControl.defaultNegativePriorityBand", flow.get("defaultNegativePriorityBand")),
        ]
        bands += [
            (f"flowControl.priorityBands[{i}]", b) for i, b in enumerate(_as_list(flow.get("priorityBands")))
        ]
        for where, band in bands:
            for key in ("fairnessPolicyRef", "orderingPolicyRef"):
                ref = _as_mapping(band).get(key)
                if isinstance(ref, str) and ref:
                    refs[f"{where}.{key}"] = ref
        return refs

    def document(self, doc: Mapping[str, Any]) -> None:
        api_version = doc.get("apiVersion")
        if api_version in LEGACY_API_VERSIONS:
            self.warn(f"apiVersion {api_version} is deprecated; use {API_VERSION}")
        elif api_version not in API_VERSIONS:
            raise self.error(f"apiVersion must be {' or '.join(API_VERSIONS)}, got {api_version!r}")
        if doc.get("kind") != KIND:
            raise self.error(f"kind must be {KIND}, got {doc.get('kind')!r}")
        for key in doc:
            if key not in _TOP_FIELDS:
                raise self.error(f"unknown field {key!r} (known: {', '.join(_TOP_FIELDS)})")
        self.feature_gates(doc.get("featureGates"))

    def feature_gates(self, value: Any) -> None:
        """Go's gates: `name` or `name=bool`. A malformed value is an error, as in Go; a gate the Go
        EPP does not register (older releases had others) is warned about and ignored (current Go
        rejects it)."""
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise self.error(f"featureGates must be a list of strings, got {value!r}")
        for gate in value:
            name, eq, setting = gate.partition("=")
            name = name.strip()
            enabled = True
            if eq:
                word = setting.strip().lower()
                if word not in _GO_TRUE | _GO_FALSE:
                    raise self.error(
                        f"featureGates: {setting!r} is not a valid value for the feature gate {name}"
                    )
                enabled = word in _GO_TRUE
            if name not in FEATURE_GATES:
                self.warn(
                    f"feature gate {name!r} is not one the Go EPP registers ({', '.join(FEATURE_GATES)}); "
                    "current Go rejects it, epp ignores it"
                )
                continue
            self.gates[name] = enabled
        if not self.gates["haPopulateNonLeaderDatastore"]:
            self.warn(
                "feature gate haPopulateNonLeaderDatastore=false is not implemented by epp: a standby "
                "replica always keeps its endpoints and metrics current"
            )

    # --- removed Go parameters that upstream configs still carry -----------------------------------

    def _legacy_parameters(self, type_name: str, name: str, raw: Any) -> Any:
        """Translate `prefix-cache-affinity-filter`'s `maxTokensInFlightPenalty`, which llm-d-router
        removed (#1547) and its optimized-baseline guide still sets: its gate (break stickiness when
        the best sticky endpoint has that many more in-flight tokens than the best other one) is
        the current TTFT gate with `maxTTFTPenaltyMs` = tokens / `peakPrefillThroughput` x 1000.
        Current Go rejects the parameter; epp loads it as that gate, with a warning."""
        if type_name != "prefix-cache-affinity-filter" or not isinstance(raw, Mapping):
            return raw
        if "maxTokensInFlightPenalty" not in raw:
            return raw
        tokens = raw["maxTokensInFlightPenalty"]
        where = f"plugin {name!r} ({type_name})"
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise self.error(f"{where}: maxTokensInFlightPenalty must be an integer >= 0, got {tokens!r}")
        params = {k: v for k, v in raw.items() if k != "maxTokensInFlightPenalty"}
        if tokens == 0:
            self.warn(f"{where}: maxTokensInFlightPenalty (removed from the Go EPP) is 0, which disabled it")
            return params
        if params.get("ttftSource") not in (None, "prefillThroughput"):
            raise self.error(
                f"{where}: maxTokensInFlightPenalty (removed from the Go EPP) cannot be combined with "
                f"ttftSource {params['ttftSource']!r}; use maxTTFTPenaltyMs with peakPrefillThroughput"
            )
        peak = params.get("peakPrefillThroughput", _PEAK_PREFILL_DEFAULT)
        if isinstance(peak, bool) or not isinstance(peak, int | float) or peak <= 0:
            raise self.error(f"{where}: peakPrefillThroughput must be a positive number, got {peak!r}")
        penalty_ms = round(tokens / peak * 1000.0, 3)
        old_ttft = params.get("maxTTFTPenaltyMs")
        params["maxTTFTPenaltyMs"] = penalty_ms
        replaced = (
            f" (its maxTTFTPenaltyMs {old_ttft} was the predicted-latency gate, which needs a latency "
            "predictor epp does not have)"
            if old_ttft
            else ""
        )
        self.warn(
            f"{where}: maxTokensInFlightPenalty was removed from the Go EPP (llm-d-router #1547; current "
            f"Go rejects it); epp reads it as the same gate in the current form: maxTTFTPenaltyMs "
            f"{penalty_ms:g} = {tokens} tokens / peakPrefillThroughput {peak:g} tokens/s{replaced}"
        )
        return params

    # --- plugins ---------------------------------------------------------------------------------

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
            raw = self._legacy_parameters(type_name, name, spec.get("parameters"))
            self.instances[name] = self._create(type_name, name, raw)
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
        """Add the default producer of every data key a plugin consumes and nothing produces, and
        then of what the added producers consume in turn."""
        produced = {
            key for p in self.instances.values() if isinstance(p, DataProducer) for key in p.produces()
        }
        pending = list(self.instances.items())
        while pending:
            name, plugin = pending.pop(0)
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
                pending.append((type_name, producer))  # what it consumes needs a producer too
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
        """Warn of scorers, filters and pickers nothing uses (run after the flowControl section:
        a saturation detector is a filter too, and the one flow control uses is in use)."""
        used_pickers = {id(p.picker) for p in profiles.values()}
        for name, plugin in self.instances.items():
            if name in self.referenced:
                continue
            if isinstance(plugin, Scorer):
                # The Go EPP loads it; it does nothing.
                self.warn(
                    f"plugin {name!r} ({self.types.get(name, plugin.type_name)}) is a scorer but no "
                    "profile uses it, so it does nothing; add it to a schedulingProfiles entry with a "
                    "weight, or remove it"
                )
            elif isinstance(plugin, Filter):
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

    # --- request handling ------------------------------------------------------------------------

    def request_handler(self, doc: Mapping[str, Any]) -> None:
        """`requestHandler.parsers` (else the deprecated `parser`) must name parser plugins. A
        reference to a parser type epp has that no plugin declares adds it, as Go does. epp parses
        requests itself (the parser plugins say how it differs); no list means Go's defaults."""
        handler = self._mapping(doc.get("requestHandler"), _REQUEST_HANDLER_FIELDS, "requestHandler")
        entries = self._list(handler.get("parsers"), "requestHandler.parsers")
        where = "requestHandler.parsers"
        if doc.get("parser") is not None:
            legacy = self._ref(doc.get("parser"), "parser")
            if entries:
                self.warn("top-level 'parser' is deprecated and ignored: requestHandler.parsers is set")
            else:
                self.warn("top-level 'parser' is deprecated; use requestHandler.parsers")
                entries, where = [{"pluginRef": legacy}], "parser"
        for i, entry in enumerate(entries):
            ref = self._ref(entry, f"{where}[{i}]" if where != "parser" else where)
            plugin = self.instances.get(ref)
            if plugin is None:
                cls = self.registry.get(ref)
                if cls is None:
                    raise self.error(f"{where} references undefined plugin {ref!r}")
                plugin = self._implicit(ref, Plugin)
                self.types[ref] = ref
            if not isinstance(plugin, Parser):
                raise self.error(f"{where}: {self._describe(ref)} is not a parser plugin")


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
    doc = loader.read(text)
    loader.missing_types(doc)
    loader.document(doc)
    loader.plugins(loader._list(doc.get("plugins"), "plugins"))
    loader.check_data_plugins()
    profile_specs = loader._list(doc.get("schedulingProfiles"), "schedulingProfiles")
    loader.bind_references(profile_specs)
    loader.default_producers()
    profiles = loader.profiles(profile_specs)
    handler = loader.handler(profiles)
    loader.request_handler(doc)
    flow_control, detector = loader.flow_control(doc)
    loader.unused(profiles)
    data_layer = loader.data_layer(doc)
    for warning in loader.warnings:
        log.warning("%s", warning)
    scheduler = Scheduler(handler, profiles, list(loader.instances.values()), timer, handle)
    admitters = [p for p in loader.instances.values() if isinstance(p, Admitter)]
    return LoadedConfig(
        scheduler, handle, loader.warnings, loader.implicit, data_layer, flow_control, detector, admitters
    )
