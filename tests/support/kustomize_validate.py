"""Offline validation of rendered manifests.

Core kinds: kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields are errors).
Custom resources: the upstream CRDs in ../shared/crds (beside the repository; never copied in):
their openAPIV3Schema made strict the way the API server's field validation is (an object with
declared properties accepts no others unless x-kubernetes-preserve-unknown-fields), after the
schema's defaults are applied, then every x-kubernetes-validations CEL rule, evaluated with
cel-python (transition rules, which need the old object, are skipped).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

from tests.support.kustomize_render import REPO, Obj

CRD_DIR = REPO.parent / "shared" / "crds"

# Validated against the Kubernetes releases at both ends of what the manifests support: native
# sidecar containers (the P/D routing sidecar) need 1.29+, so 1.30 is the floor checked.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

CORE_GROUPS = {"", "apps", "rbac.authorization.k8s.io", "policy", "batch", "autoscaling", "networking.k8s.io"}


def crd_dir() -> Path:
    if not CRD_DIR.is_dir() or not any(CRD_DIR.glob("*.yaml")):
        raise AssertionError(
            f"the upstream CRDs are missing: expected them in {CRD_DIR} (the shared/ folder beside the "
            "repository, as CI has it). They are read from there, never copied into the repository."
        )
    return CRD_DIR


def api_group(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def is_core(obj: Obj) -> bool:
    return api_group(obj["apiVersion"]) in CORE_GROUPS


def validate_core(obj: Obj, kubernetes_version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def _strict(schema: Any) -> Any:
    """Objects with declared properties reject undeclared ones (the API server's strict field
    validation), unless the schema preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does before validation."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub:
                apply_defaults(sub, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


class CrdCatalog:
    """(apiVersion, kind) -> the served version's openAPIV3Schema, from ../shared/crds."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or crd_dir()
        self.schemas: dict[tuple[str, str], dict[str, Any]] = {}
        self.files: dict[tuple[str, str], str] = {}
        for path in sorted(self.directory.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                key = (f"{group}/{version['name']}", kind)
                self.schemas[key] = version["schema"]["openAPIV3Schema"]
                self.files[key] = path.name
        self._env = celpy.Environment()
        self.cel_rules_evaluated = 0

    def knows(self, obj: Obj) -> bool:
        return (obj["apiVersion"], obj["kind"]) in self.schemas

    @functools.cache  # noqa: B019 - one catalog per test session
    def _validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator:
        schema = _strict(self.schemas[(api_version, kind)])
        # The API server accepts these at the root whether or not the CRD declares them (Istio's
        # CRDs do not); metadata is validated by the server itself, not by the CRD.
        root = schema.setdefault("properties", {})
        for implicit in ("apiVersion", "kind", "metadata"):
            root.setdefault(implicit, {})
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        return cls(schema)

    @functools.cache  # noqa: B019
    def _program(self, rule: str) -> celpy.Runner:
        return self._env.program(self._env.compile(rule))

    def validate(self, obj: Obj) -> list[str]:
        key = (obj["apiVersion"], obj["kind"])
        schema = self.schemas[key]
        value = apply_defaults(schema, copy.deepcopy(obj))
        errors = [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in self._validator(*key).iter_errors(value)
        ]
        errors += self._cel(schema, value, obj["kind"])
        return errors

    def _cel(self, schema: dict[str, Any] | None, value: Any, path: str) -> list[str]:
        if not isinstance(schema, dict):
            return []
        errors = []
        for rule in schema.get("x-kubernetes-validations") or []:
            text = rule["rule"]
            if "oldSelf" in text:  # a transition rule: only meaningful on update
                continue
            self.cel_rules_evaluated += 1
            try:
                result = self._program(text).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as exc:  # the rule could not be evaluated: report, do not pass
                errors.append(f"{path}: CEL rule {text!r} could not be evaluated: {exc}")
                continue
            if isinstance(result, Exception) or not bool(result):
                errors.append(f"{path}: {rule.get('message') or 'CEL rule failed'} ({text})")
        if isinstance(value, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key) or (extra if isinstance(extra, dict) else None)
                errors += self._cel(sub, item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                errors += self._cel(schema.get("items"), item, f"{path}[{i}]")
        return errors
