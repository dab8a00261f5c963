"""InferenceModelRewrites: the model a request is sent to, chosen from the model it names.

An InferenceModelRewrite (group `llm-d.ai`, version `v1alpha2`, as llm-d-router serves it; alpha
upstream) holds ordered rules. A rule's `matches` name models exactly (any one matches; none: the
rule matches every model, a generic fallback); its `targets` are the models to send the request
to, chosen per request by `weight` (all unweighted: equal shares). Precedence, as upstream: an
exact match beats a generic rule; between objects the oldest (creationTimestamp) wins; inside
one object the first rule in list order.

Rewrites come from Kubernetes (in the pool's namespace, only those whose `spec.poolRef` names
our pool: `RewriteWatcher`), or, without Kubernetes, from a YAML file of InferenceModelRewrite
manifests (`load_rewrites_file`, flag `--inference-model-rewrites-file`). An invalid object is
logged and skipped by the watch; in the file it is an error at start.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from epp.discovery.pool_objects import PoolObjectWatcher
from epp.errors import ConfigError, brief

if TYPE_CHECKING:  # kubernetes-asyncio is slow to import: only Kubernetes mode pays for it
    from epp.discovery.kubeclient import KubeClient
    from epp.discovery.reflector import Backoff

log = logging.getLogger(__name__)

REWRITE_GROUP = "llm-d.ai"
REWRITE_VERSION = "v1alpha2"
REWRITE_PLURAL = "inferencemodelrewrites"
REWRITE_KIND = "InferenceModelRewrite"
# A file may use either group's apiVersion: upstream's docs still show the older one.
REWRITE_API_VERSIONS = (f"{REWRITE_GROUP}/{REWRITE_VERSION}", "inference.networking.x-k8s.io/v1alpha2")
# The request header that names the target model when no rule matches (upstream's, and its alias).
REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")

# Bounds on what a namespace (or a file) can make epp hold.
MAX_REWRITES = 1000  # objects
MAX_RULES = 64  # rules in one object
MAX_MATCHES = 64  # matches in one rule
# Model matches of all objects together: the index is rebuilt on every change, on the event loop,
# so its size is what one change costs (1,000 objects of 64 x 64 would be 4M entries, seconds).
MAX_TOTAL_MATCHES = 10_000
MAX_TARGETS = 64  # targets in one rule
MAX_MODEL_NAME = 1024  # characters in a model name
MAX_WEIGHT = 1_000_000  # the CRD's bound on a target's weight (and 1 its minimum)
MAX_FILE_BYTES = 8 * 1024 * 1024  # --inference-model-rewrites-file


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule: the models it matches (empty: every model) and where it sends them."""

    source: str  # the InferenceModelRewrite's name (the decisions metric's model_rewrite_name)
    models: tuple[str, ...]
    targets: tuple[str, ...]
    # Running sums of the targets' weights (an unweighted target among weighted ones adds 0, so it
    # is never chosen, as upstream); empty when no target has a weight: equal shares.
    cumulative: tuple[int, ...] = ()

    def choose(self, rng: random.Random) -> str:
        """A target for one request, in proportion to the weights."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0]
        if not self.cumulative:
            return targets[rng.randrange(len(targets))]
        return targets[bisect.bisect_right(self.cumulative, rng.randrange(self.cumulative[-1]))]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    """One InferenceModelRewrite object, validated."""

    name: str
    created: float  # creationTimestamp as seconds since the epoch (0: not given, e.g. in a file)
    order: int  # position in its file (0 from Kubernetes): breaks ties between equal timestamps
    rules: tuple[RewriteRule, ...]

    @property
    def precedence(self) -> tuple[float, int, str]:
        return (self.created, self.order, self.name)


class RewriteStore:
    """The rewrites of one pool, indexed for the request path: a model's rule is one dict lookup."""

    def __init__(self) -> None:
        self._objects: dict[str, ModelRewrite] = {}
        self._exact: dict[str, RewriteRule] = {}  # model -> the rule with precedence for it
        self._generic: RewriteRule | None = None  # the generic rule with precedence
        self._matches = 0  # model matches of all objects held (at most MAX_TOTAL_MATCHES)

    def __len__(self) -> int:
        return len(self._objects)

    def rule_for(self, model: str) -> RewriteRule | None:
        """The rule that applies to a request for `model`, or None."""
        rule = self._exact.get(model)
        return rule if rule is not None else self._generic

    def replace(self, rewrites: Iterable[ModelRewrite]) -> None:
        objects: dict[str, ModelRewrite] = {}
        dropped = matches = 0
        for rewrite in rewrites:
            held = objects.get(rewrite.name)
            more = _matches(rewrite) - _matches(held)
            if (held is not None or len(objects) < MAX_REWRITES) and matches + more <= MAX_TOTAL_MATCHES:
                objects[rewrite.name] = rewrite
                matches += more
            else:
                dropped += 1
        if dropped:
            log.warning(
                "%d InferenceModelRewrites ignored: at most %d objects and %d model matches are held",
                dropped,
                MAX_REWRITES,
                MAX_TOTAL_MATCHES,
            )
        self._objects = objects
        self._matches = matches
        self._index()

    def put(self, rewrite: ModelRewrite) -> None:
        held = self._objects.get(rewrite.name)
        if held == rewrite:
            return  # e.g. a status-only update: nothing to index again
        if held is None and len(self._objects) >= MAX_REWRITES:
            log.warning("InferenceModelRewrite %s ignored: already %d held", rewrite.name, MAX_REWRITES)
            return
        matches = self._matches + _matches(rewrite) - _matches(held)
        if matches > MAX_TOTAL_MATCHES:
            log.warning(
                "InferenceModelRewrite %s ignored: the rewrites would match more than %d models",
                rewrite.name,
                MAX_TOTAL_MATCHES,
            )
            return
        self._objects[rewrite.name] = rewrite
        self._matches = matches
        self._index()

    def delete(self, name: str) -> None:
        held = self._objects.pop(name, None)
        if held is not None:
            self._matches -= _matches(held)
            self._index()

    def _index(self) -> None:
        """Rebuilt on every change (changes are rare, lookups per request), swapped in whole."""
        exact: dict[str, RewriteRule] = {}
        generic: RewriteRule | None = None
        for rewrite in sorted(self._objects.values(), key=lambda r: r.precedence):
            for rule in rewrite.rules:
                if not rule.models:
                    generic = generic or rule
                for model in rule.models:
                    exact.setdefault(model, rule)
        self._exact, self._generic = exact, generic


def _matches(rewrite: ModelRewrite | None) -> int:
    """The model matches of an object (0: none held)."""
    return sum(len(rule.models) for rule in rewrite.rules) if rewrite is not None else 0


# --- validation (the CRD's rules, and epp's bounds) ------------------------------------------------


def _list(value: Any, where: str, most: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, got {brief(value)}")
    if len(value) > most:
        raise ConfigError(f"{where} has {len(value)} entries; at most {most}")
    return value


def _model_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {brief(value)}")
    if len(value) > MAX_MODEL_NAME:
        raise ConfigError(f"{where} is longer than {MAX_MODEL_NAME} characters")
    return value


def _weight(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise ConfigError(f"{where} must be an integer from 1 to {MAX_WEIGHT}, got {brief(value)}")
    return value


def _match(value: Any, where: str) -> str:
    model = value.get("model") if isinstance(value, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConfigError(f"{where}.model is required (type, value)")
    kind = model.get("type")
    if kind not in (None, "Exact"):
        raise ConfigError(f"{where}.model.type must be Exact (the only type upstream has), got {brief(kind)}")
    return _model_name(model.get("value"), f"{where}.model.value")


def _rule(value: Any, where: str, source: str) -> RewriteRule:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {brief(value)}")
    models = tuple(
        _match(m, f"{where}.matches[{i}]")
        for i, m in enumerate(_list(value.get("matches"), f"{where}.matches", MAX_MATCHES))
    )
    targets = _list(value.get("targets"), f"{where}.targets", MAX_TARGETS)
    if not targets:
        raise ConfigError(f"{where}.targets: at least one target is required")
    names: list[str] = []
    weights: list[int | None] = []
    for i, target in enumerate(targets):
        here = f"{where}.targets[{i}]"
        if not isinstance(target, Mapping):
            raise ConfigError(f"{here} must be a mapping, got {brief(target)}")
        names.append(_model_name(target.get("modelRewrite"), f"{here}.modelRewrite"))
        weights.append(_weight(target.get("weight"), f"{here}.weight"))
    cumulative: tuple[int, ...] = ()
    if any(w is not None for w in weights):
        if None in weights:
            log.warning(
                "%s: weights are mixed; targets without a weight are never chosen (as upstream)", where
            )
        running, sums = 0, []
        for w in weights:
            running += w or 0
            sums.append(running)
        cumulative = tuple(sums)
    return RewriteRule(source, models, tuple(names), cumulative)


def _created(value: Any, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):  # RFC 3339, as the API server writes it
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(
                f"{where}: metadata.creationTimestamp {brief(value)} is not a timestamp"
            ) from None
    if isinstance(value, dt.datetime):  # YAML reads an unquoted timestamp as one
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return float(value.timestamp())
    raise ConfigError(f"{where}: metadata.creationTimestamp must be a timestamp, got {brief(value)}")


def parse_rewrite(obj: Mapping[str, Any], where: str = "", order: int = 0) -> ModelRewrite:
    """One InferenceModelRewrite object; ConfigError saying what is wrong with it (its message
    starts with `where`)."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}{REWRITE_KIND}: metadata.name is required")
    where = f"{where}{REWRITE_KIND} {name}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: spec is required (poolRef, rules)")
    if spec.get("rules") is None:
        raise ConfigError(f"{where}: spec.rules is required")
    rules = _list(spec["rules"], f"{where}: spec.rules", MAX_RULES)
    parsed = tuple(_rule(rule, f"{where}: spec.rules[{i}]", name) for i, rule in enumerate(rules))
    return ModelRewrite(name, _created(meta.get("creationTimestamp"), where), order, parsed)


def parse_rewrites(docs: Iterable[Any], source: str) -> list[ModelRewrite]:
    out: list[ModelRewrite] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{source} document {i + 1}: "
        if not isinstance(doc, Mapping) or doc.get("kind") != REWRITE_KIND:
            raise ConfigError(f"{where}expected kind {REWRITE_KIND}, got {brief(doc)}")
        api_version = doc.get("apiVersion")
        if api_version is not None and api_version not in REWRITE_API_VERSIONS:
            raise ConfigError(
                f"{where}apiVersion {brief(api_version)} is not one of {', '.join(REWRITE_API_VERSIONS)}"
            )
        out.append(parse_rewrite(doc, where, order=i))
        if len(out) > MAX_REWRITES:
            raise ConfigError(f"{source}: more than {MAX_REWRITES} {REWRITE_KIND}s")
    return out


def load_rewrites_file(path: str) -> list[ModelRewrite]:
    """InferenceModelRewrite manifests (multi-document YAML) from a file; ConfigError if unusable."""
    flag = f"--inference-model-rewrites-file {path}"
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{flag}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{flag}: larger than {MAX_FILE_BYTES} bytes")
    try:
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag}: not valid YAML: {exc}") from None
    return parse_rewrites(docs, path)


class RewriteWatcher(PoolObjectWatcher[ModelRewrite]):
    """Keeps a RewriteStore in step with the InferenceModelRewrites of one pool."""

    kind = REWRITE_KIND
    task = "inference-model-rewrites"
    group = REWRITE_GROUP
    version = REWRITE_VERSION
    plural = REWRITE_PLURAL

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pool_name: str,
        pool_group: str,
        store: RewriteStore,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        super().__init__(client, namespace, pool_name, pool_group, backoff)

    def parse(self, obj: Mapping[str, Any], name: str) -> ModelRewrite:
        return parse_rewrite(obj)

    def replace(self, entries: list[ModelRewrite]) -> None:
        self.store.replace(entries)

    def put(self, entry: ModelRewrite) -> None:
        self.store.put(entry)

    def delete(self, name: str) -> None:
        self.store.delete(name)

    def __len__(self) -> int:
        return len(self.store)
