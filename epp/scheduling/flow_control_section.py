"""The loader's flow-control section (docs/flow-control.md): `flowControl` (read by
`epp.flowcontrol.config` when the `flowControl` feature gate is on, as in Go; its field types
checked either way) and its saturation detector (also the deprecated top-level
`saturationDetector`), with the defaults the Go loader adds."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from epp.flowcontrol.config import (
    DEFAULT_FAIRNESS_POLICY,
    DEFAULT_ORDERING_POLICY,
    FlowControlConfig,
    build_config,
)
from epp.framework import OrderingPolicy, SaturationDetector, UsageLimitPolicy
from epp.scheduling.config_reader import FLOW_CONTROL_GATE, ConfigReader, K

_FLOW_CONTROL_FIELDS = (
    "maxBytes",
    "maxRequests",
    "defaultRequestTTL",
    "noEndpointRequestTTL",
    "defaultPriorityBand",
    "defaultNegativePriorityBand",
    "priorityBands",
    "usageLimitPolicyPluginRef",
    "saturationDetector",
    "enableEviction",
)
_PRIORITY_BAND_FIELDS = ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef")

# What the Go loader adds when these are referenced and not declared.
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_FLOW_CONTROL_POLICIES = (
    "global-strict-fairness-policy",
    "fcfs-ordering-policy",
    "static-usage-limit-policy",
)


class FlowControlSection(ConfigReader):
    """Reads `flowControl` once every plugin exists (its policies and detector are plugins)."""

    def flow_control(
        self, doc: Mapping[str, Any]
    ) -> tuple[FlowControlConfig | None, SaturationDetector | None]:
        """The flow-control settings (None unless the `flowControl` gate is on, as in Go) and the
        saturation detector (the default `utilization-detector` when none is named: Go's legacy
        admission refuses sheddable requests with it when flow control is off)."""
        flow = self._mapping(doc.get("flowControl"), _FLOW_CONTROL_FIELDS, "flowControl")
        self._flow_control_shapes(flow)
        detector_spec, where = flow.get("saturationDetector"), "flowControl.saturationDetector"
        if doc.get("saturationDetector") is not None:
            legacy = self._ref(doc.get("saturationDetector"), "saturationDetector", required=False)
            if detector_spec is None:
                self.warn("top-level 'saturationDetector' is deprecated; use flowControl.saturationDetector")
                detector_spec, where = {"pluginRef": legacy}, "saturationDetector"
            else:
                self.warn(
                    "top-level 'saturationDetector' is deprecated and ignored: "
                    "flowControl.saturationDetector is set"
                )
        # An empty reference means Go's default detector, which the Go loader adds itself.
        ref = self._ref(detector_spec, where, required=False) if detector_spec is not None else ""
        detector = (
            self._flow_plugin(
                ref, where, SaturationDetector, "saturation detector", (DEFAULT_SATURATION_DETECTOR,)
            )
            if ref
            else None
        )
        settings = [k for k in flow if k != "saturationDetector"]
        if self.gates[FLOW_CONTROL_GATE]:
            if detector is None:
                detector = self._implicit(DEFAULT_SATURATION_DETECTOR, SaturationDetector)
                self.referenced.add(DEFAULT_SATURATION_DETECTOR)
            if flow.get("enableEviction"):
                self.warn("flowControl.enableEviction is not implemented by epp and is ignored")
            return build_config(flow, self._flow_policy), detector
        if settings:
            # The Go EPP's own warning: without the gate only the saturation detector is used.
            self.warn(
                "the flowControl section is set but the flowControl feature gate is disabled; its "
                f"settings (other than saturationDetector) are ignored: {', '.join(settings)}"
            )
        if detector is None and DEFAULT_SATURATION_DETECTOR in self.registry:
            made = self._create(DEFAULT_SATURATION_DETECTOR, DEFAULT_SATURATION_DETECTOR, None)
            detector = made if isinstance(made, SaturationDetector) else None
        return None, detector

    def _flow_policy(self, ref: str, kind: type[K], where: str) -> K:
        """A band's policy: the default type when the reference is empty; a default type that no
        plugin declares is added, as Go adds it."""
        if not ref:
            default = DEFAULT_ORDERING_POLICY if kind is OrderingPolicy else DEFAULT_FAIRNESS_POLICY
            return self._implicit(default, kind)
        name = {OrderingPolicy: "ordering policy", UsageLimitPolicy: "usage limit policy"}.get(
            kind, "fairness policy"
        )
        return self._flow_plugin(ref, where, kind, name, DEFAULT_FLOW_CONTROL_POLICIES)

    def _flow_plugin(
        self, ref: str, where: str, kind: type[K], name: str, defaults: Collection[str] = ()
    ) -> K:
        """The plugin `ref` names; one of Go's `defaults` named and not declared is added, as the
        Go loader adds it."""
        plugin = self.instances.get(ref)
        if plugin is None and ref in defaults and ref in self.registry:
            plugin = self._implicit(ref, kind)
        if plugin is None:
            raise self.error(f"{where} references undefined plugin {ref!r}")
        if not isinstance(plugin, kind):
            raise self.error(f"{where}: {self._describe(ref)} is not a {name}")
        self.referenced.add(ref)
        return plugin

    def _flow_control_shapes(self, flow: Mapping[str, Any]) -> None:
        """The field types the Go decoder enforces (quantities, durations, bands)."""
        for key in ("maxBytes", "maxRequests"):
            self._quantity(flow.get(key), f"flowControl.{key}")
        for key in ("defaultRequestTTL", "noEndpointRequestTTL"):
            self._duration(flow.get(key), f"flowControl.{key}")
        if "enableEviction" in flow and not isinstance(flow["enableEviction"], bool):
            raise self.error(
                f"flowControl.enableEviction must be true or false, got {flow['enableEviction']!r}"
            )
        usage = flow.get("usageLimitPolicyPluginRef")
        if usage is not None and not isinstance(usage, str):
            raise self.error(f"flowControl.usageLimitPolicyPluginRef must be a string, got {usage!r}")
        bands: list[tuple[str, Any]] = [
            ("flowControl.defaultPriorityBand", flow.get("defaultPriorityBand")),
            ("flowControl.defaultNegativePriorityBand", flow.get("defaultNegativePriorityBand")),
        ]
        bands += [
            (f"flowControl.priorityBands[{i}]", b)
            for i, b in enumerate(self._list(flow.get("priorityBands"), "flowControl.priorityBands"))
        ]
        for where, value in bands:
            band = self._mapping(value, _PRIORITY_BAND_FIELDS, where)
            priority = band.get("priority", 0)
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise self.error(f"{where}.priority must be an integer, got {priority!r}")
            for key in ("maxBytes", "maxRequests"):
                self._quantity(band.get(key), f"{where}.{key}")
            for key in ("fairnessPolicyRef", "orderingPolicyRef"):
                if band.get(key) is not None and not isinstance(band[key], str):
                    raise self.error(f"{where}.{key} must be a string, got {band[key]!r}")
