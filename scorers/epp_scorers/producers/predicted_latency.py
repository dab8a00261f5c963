"""`predicted-latency-producer`: predicts each candidate endpoint's TTFT and TPOT for this request
and publishes them, with the headroom to the request's SLOs, for `latency-scorer`,
`slo-headroom-tier-filter`, `latency-slo-admitter` and `prefix-cache-affinity-filter`
(`ttftSource: latencyPredictor`).

SLOs come from the request headers `x-llm-d-slo-ttft-ms` and `x-llm-d-slo-tpot-ms` (or the older
`x-slo-ttft-ms` / `x-slo-tpot-ms`), in milliseconds; a missing or malformed one counts as 0, so
its headroom is minus the prediction (every endpoint "violates" it and the scorer simply prefers
the lowest prediction). Headroom = SLO - predicted; valid = predicted < SLO. The TPOT SLO is
multiplied by `sloBufferFactor` and, with `streamingMode`, tightened to the smallest TPOT SLO of
the requests already running on the endpoint. Without `streamingMode` (the default) epp learns
the end-to-end latency as "TTFT" (a non-streamed response's first token is its end) and TPOT is
neutral: valid, headroom 0; likewise on endpoints whose `endpointRoleLabel` label is `prefill`.

The predictor. Features per endpoint (scorers/epp_scorers/producers/latency_model.py): KV-cache
use, the request's input tokens, waiting and running requests (epp's in-flight count when the
in-flight producer runs), the prefix share the endpoint holds, the prefill tokens in flight there,
and the tokens it would have to prefill. Each completed response routed by a pick of this
producer is an observation (its features at the pick, its measured TTFT and TPOT); the model is
least squares over the last 2048 observations, refitted every 16 once 32 were seen, in the
response's completion hook (off the reply path); predictions for all candidates are one matrix
product. Until the first fit nothing is published: the scorer falls back to KV / queue / prefix,
the filter and the admitter let everything through. With `TRAINING_SERVER_URL` set (upstream's
sidecar), observations are also posted to its training server and, while the server publishes a
linear model (Bayesian Ridge), its coefficients are used instead (latency_sidecar.py).

Consumes: the prefix match (`prefixMatchInfoProducerName`) and the in-flight load
(`inFlightLoadProducerName`). Produces: `latency-prediction-info`. Hooks: pre-request, response
measured / complete, endpoint removed; a background task when a training server is configured.

    plugins:
    - type: predicted-latency-producer
      parameters: {streamingMode: true, sloBufferFactor: 0.9}
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Self

import numpy as np
import numpy.typing as npt
from prometheus_client import Histogram

from epp.framework import (
    BackgroundService,
    CappedChildren,
    ConfigError,
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    EndpointListener,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    ResponseComplete,
    ResponseMeasured,
    ResponseStats,
    SchedulingResult,
    ServedElsewhere,
    ServiceContext,
    endpoint_positions,
    metric_columns,
)
from epp_scorers.data import DEFAULT_INFLIGHT_PRODUCER, DEFAULT_PREFIX_PRODUCER, INFLIGHT_LOAD, PREFIX_MATCH
from epp_scorers.producers.latency_model import FEATURES, TPOT_FEATURES, FloatArray, OnlineLinearModel
from epp_scorers.producers.latency_sidecar import LatencySidecar, SidecarConfig

DEFAULT_LATENCY_PRODUCER = "predicted-latency-producer"
TTFT_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_SLO_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
_MAX_PENDING = 10_000  # routed requests awaiting their response's measurement (bounded)
# llm-d-router's buckets for the predicted TTFT and TPOT histograms.
_TTFT_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
    60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6,
    0.8, 1, 1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360,
)  # fmt: skip
_LABELS = ("plugin_name", "plugin_type", "model_name", "target_model_name")
_OLD_LABELS = ("model_name", "target_model_name")  # the deprecated inference_objective_* twins
# The model names come from the request: at most this many (model, target) label sets, each value
# at most this long; the rest are reported as "other", as epp's request metrics are.
MAX_MODEL_LABEL_SETS = 1000
MAX_MODEL_LABEL_CHARS = 1024
OTHER_MODEL = "other"


def slo_ms(headers: Mapping[str, str], names: Sequence[str]) -> float:
    """The SLO the first present header gives, in ms; 0 when absent or not a finite number >= 0."""
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            return 0.0
        return value if math.isfinite(value) and value > 0 else 0.0
    return 0.0


class LatencyPrediction(NamedTuple):  # a tuple, made from the PredictionTable when asked for
    """One endpoint's predicted latencies (ms) for this request and their headroom to its SLOs."""

    ttft_ms: float
    tpot_ms: float
    ttft_valid: bool
    tpot_valid: bool
    ttft_headroom_ms: float
    tpot_headroom_ms: float
    dispatched: int  # requests epp has in flight to the endpoint

    @property
    def valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid


@dataclass(frozen=True, slots=True)
class PredictionTable:
    """A request's predictions as columns, one row per candidate (the producer's candidates, in
    order): what `LatencyPredictions.get` reads one row of, and scorers read whole."""

    ttft_ms: list[float]
    tpot_ms: list[float]
    ttft_valid: list[bool]
    tpot_valid: list[bool]
    ttft_headroom_ms: FloatArray
    tpot_headroom_ms: FloatArray
    dispatched: FloatArray  # requests epp had in flight to each endpoint


class LatencyPredictions:
    """This request's predictions per candidate endpoint, computed on first read (another
    producer's data, e.g. the prefix match, may be published after this producer ran)."""

    __slots__ = (
        "_computed",
        "_cycle",
        "_endpoints",
        "_producer",
        "_request",
        "_rows",
        "_table",
        "_x",
        "tpot_slo_ms",
        "ttft_slo_ms",
    )

    def __init__(
        self,
        producer: PredictedLatencyProducer,
        cycle: CycleState,
        request: InferenceRequest,
        endpoints: Sequence[Endpoint],
    ) -> None:
        self._producer = producer
        self._cycle = cycle
        self._request = request
        self._endpoints = endpoints
        self._table: PredictionTable | None = None  # computed on first read; None after: no model
        self._computed = False
        self._rows: dict[str, int] = {}  # endpoint key -> its row of _x and of the table
        self._x: FloatArray | None = None  # the candidates' features, once computed
        self.ttft_slo_ms = slo_ms(request.headers, TTFT_SLO_HEADERS)
        self.tpot_slo_ms = slo_ms(request.headers, TPOT_SLO_HEADERS)

    def table(self) -> PredictionTable | None:
        """Every candidate's predictions at once (rows as `rows_of` gives them); None without a
        model yet."""
        if not self._computed:
            self._table = self._producer.predict(self)
            self._computed = True
        return self._table

    def get(self, endpoint: Endpoint) -> LatencyPrediction | None:
        """The endpoint's prediction; None without a model yet (or for a non-candidate)."""
        table = self.table()
        row = self._rows.get(endpoint.key) if table is not None else None
        if table is None or row is None:
            return None
        return LatencyPrediction(
            table.ttft_ms[row],
            table.tpot_ms[row],
            table.ttft_valid[row],
            table.tpot_valid[row],
            float(table.ttft_headroom_ms[row]),
            float(table.tpot_headroom_ms[row]),
            int(table.dispatched[row]),
        )

    def rows_of(self, endpoints: Sequence[Endpoint]) -> npt.NDArray[np.intp]:
        """Each endpoint's row of the table (-1: not a candidate when the predictions were made)."""
        if endpoints is self._endpoints:
            return np.arange(len(endpoints), dtype=np.intp)
        rows = self._rows
        return np.fromiter((rows.get(ep.key, -1) for ep in endpoints), np.intp, len(endpoints))

    @property
    def available(self) -> bool:
        """Whether any endpoint has a prediction."""
        return self.table() is not None

    def features_of(self, endpoint: Endpoint) -> FloatArray | None:
        """The endpoint's feature row (a copy), computing the predictions if needed."""
        self.get(endpoint)
        row = self._rows.get(endpoint.key)
        return None if row is None or self._x is None else self._x[row].copy()


LATENCY_PREDICTION: DataKey[LatencyPredictions] = DataKey("latency-prediction-info", DEFAULT_LATENCY_PRODUCER)


_Children = tuple[Any, Any, Any, Any]  # the ttft, old ttft, tpot and old tpot children of one label set


@dataclass(frozen=True, slots=True)
class PredictionHistograms:
    """The predicted TTFT / TPOT of the endpoint each request was routed to, under llm-d-router's
    names, labels and buckets, and their deprecated `inference_objective_*` twins."""

    ttft: Histogram
    tpot: Histogram
    old_ttft: Histogram
    old_tpot: Histogram
    # (plugin, model, target) -> the children, resolved once a label set (capped: see above)
    _children: CappedChildren[tuple[str, str, str, str], _Children] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_children",
            CappedChildren(
                MAX_MODEL_LABEL_SETS, self._make, lambda key: (*key[:2], OTHER_MODEL, OTHER_MODEL)
            ),
        )

    @classmethod
    def register(cls, handle: PluginHandle) -> PredictionHistograms:
        def pair(kind: str, buckets: Sequence[float]) -> tuple[Histogram, Histogram]:
            what = (
                f"Inference model Predicted {kind.upper()} distribution in seconds for each model and "
                "target model."
            )
            name = f"request_predicted_{kind}_seconds"
            new = handle.histogram(f"llm_d_epp_{name}", f"[ALPHA] {what}", _LABELS, buckets)
            old_help = f"[ALPHA] [Deprecated: Use llm_d_epp_{name}] {what}"
            return new, handle.histogram(f"inference_objective_{name}", old_help, _OLD_LABELS, buckets)

        ttft, old_ttft = pair("ttft", _TTFT_BUCKETS)
        tpot, old_tpot = pair("tpot", _TPOT_BUCKETS)
        return cls(ttft, tpot, old_ttft, old_tpot)

    def observe(
        self, plugin: PredictedLatencyProducer, request: InferenceRequest, p: LatencyPrediction, *, tpot: bool
    ) -> None:
        ttft, old_ttft, tpot_child, old_tpot = self._of(plugin, request.model, request.target_model)
        ttft.observe(p.ttft_ms / 1000.0)
        old_ttft.observe(p.ttft_ms / 1000.0)
        if tpot:
            tpot_child.observe(p.tpot_ms / 1000.0)
            old_tpot.observe(p.tpot_ms / 1000.0)

    def _of(self, plugin: PredictedLatencyProducer, model: str, target: str) -> _Children:
        if len(model) > MAX_MODEL_LABEL_CHARS or len(target) > MAX_MODEL_LABEL_CHARS:
            model = target = OTHER_MODEL
        return self._children.get((plugin.name, plugin.type_name, model, target))

    def _make(self, key: tuple[str, str, str, str]) -> _Children:
        name, type_name, model, target = key
        return (
            self.ttft.labels(name, type_name, model, target),
            self.old_ttft.labels(model, target),
            self.tpot.labels(name, type_name, model, target),
            self.old_tpot.labels(model, target),
        )


@dataclass(slots=True)
class _Pending:
    """A request routed with a prediction, until its response completes."""

    request: InferenceRequest  # held, so that its id() keys this entry and no other
    x: FloatArray  # its features at the pick
    planned: str  # the endpoint picked (a fallback serving: its latency is not learned)
    prediction: LatencyPrediction | None
    slo_at: str = ""  # the endpoint whose running TPOT SLOs count this request ("" none)


class PredictedLatencyProducer(
    DataProducer,
    PreRequest,
    ServedElsewhere,
    ResponseMeasured,
    ResponseComplete,
    EndpointListener,
    BackgroundService,
):
    """Predicts each candidate's TTFT and TPOT for the request (a model learned online from the
    responses epp routes, or upstream's training server when `TRAINING_SERVER_URL` is set) and
    publishes them with their headroom to the request's SLO headers."""

    type_name = "predicted-latency-producer"
    parameters = (
        ParamDoc(
            "sloBufferFactor", "float", "1.0", "Multiplier of the TPOT SLO before it is compared (> 0)."
        ),
        ParamDoc(
            "streamingMode",
            "bool",
            "false",
            "Learn TTFT at the first streamed chunk and TPOT after it; false: learn the end-to-end "
            "latency as TTFT and leave TPOT neutral.",
        ),
        ParamDoc(
            "endpointRoleLabel",
            "string",
            "",
            "Label whose value `prefill` marks endpoints whose TPOT is neutral.",
        ),
        ParamDoc("predictInProduce", "bool", "true", "false: only learn (publish no predictions)."),
        ParamDoc(
            "prefixMatchInfoProducerName", "string", DEFAULT_PREFIX_PRODUCER, "Producer of the prefix match."
        ),
        ParamDoc(
            "inFlightLoadProducerName", "string", DEFAULT_INFLIGHT_PRODUCER, "Producer of the in-flight load."
        ),
        ParamDoc(
            "contextTTL", "string", "5m", "Not needed by epp (request state ends with the response); ignored."
        ),
        ParamDoc("samplingMean", "float", "1000", "Deprecated upstream; ignored."),
        ParamDoc("maxDecodeTokenSamplesForPrediction", "int", "0", "Deprecated upstream; ignored."),
        ParamDoc("useEncoderCacheFeatures", "bool", "false", "Not implemented (no encoder-cache producer)."),
        ParamDoc("encoderCacheMatchInfoProducerName", "string", "", "Not implemented; ignored."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        slo_buffer_factor: float = 1.0,
        streaming_mode: bool = False,
        endpoint_role_label: str = "",
        predict_in_produce: bool = True,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
        inflight_producer: str = DEFAULT_INFLIGHT_PRODUCER,
        sidecar: SidecarConfig | None = None,
        window: int = 2048,
        histograms: PredictionHistograms | None = None,
    ) -> None:
        super().__init__(name)
        if slo_buffer_factor <= 0:
            raise ConfigError(f"sloBufferFactor must be > 0, got {slo_buffer_factor}")
        self.slo_buffer_factor = slo_buffer_factor
        self.streaming_mode = streaming_mode
        self.role_label = endpoint_role_label
        self.predict_in_produce = predict_in_produce
        self.key = LATENCY_PREDICTION.for_producer(self.name)
        self.prefix_key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)
        self.load_key = INFLIGHT_LOAD.for_producer(inflight_producer or DEFAULT_INFLIGHT_PRODUCER)
        self.ttft_model = OnlineLinearModel(len(FEATURES), window=window)
        self.tpot_model = OnlineLinearModel(TPOT_FEATURES, window=window)
        self.sidecar = LatencySidecar(sidecar) if sidecar is not None else None
        self.histograms = histograms  # llm_d_epp_request_predicted_{ttft,tpot}_seconds and twins
        # Keyed by the request object's id (x-request-id is the client's: two requests in flight may
        # share one). At most _MAX_PENDING, the oldest forgotten first.
        self._pending: dict[int, _Pending] = {}
        # endpoint key -> {request's id(): TPOT SLO} of the requests running there (streaming mode)
        self._running_tpot_slo: dict[str, dict[int, float]] = {}

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        for key, reason in (
            ("contextTTL", "epp drops a request's state when its response ends"),
            ("samplingMean", "deprecated upstream"),
            ("maxDecodeTokenSamplesForPrediction", "deprecated upstream"),
            ("useEncoderCacheFeatures", "epp has no multimodal encoder-cache producer"),
            ("encoderCacheMatchInfoProducerName", "epp has no multimodal encoder-cache producer"),
        ):
            params.unimplemented(key, reason=reason)
        return cls(
            name,
            slo_buffer_factor=params.get_float("sloBufferFactor", 1.0),
            streaming_mode=params.get_bool("streamingMode", False),
            endpoint_role_label=params.get_str("endpointRoleLabel", ""),
            predict_in_produce=params.get_bool("predictInProduce", True),
            prefix_producer=params.get_str("prefixMatchInfoProducerName", ""),
            inflight_producer=params.get_str("inFlightLoadProducerName", ""),
            sidecar=SidecarConfig.from_env(os.environ),
            histograms=PredictionHistograms.register(handle),
        )

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.prefix_key, self.load_key)

    def produces(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def produce(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        cycle.write(self.key, LatencyPredictions(self, cycle, request, endpoints))

    # --- prediction ------------------------------------------------------------------------------

    def features(self, predictions: LatencyPredictions) -> FloatArray:
        """The feature matrix of a request's candidates, one row per endpoint (FEATURES order)."""
        cycle, endpoints = predictions._cycle, predictions._endpoints
        match = cycle.read(self.prefix_key)
        load = cycle.read(self.load_key)
        cols = metric_columns(endpoints)  # the datastore's columns: no pass over the endpoints
        x = np.empty((len(endpoints), len(FEATURES)))
        x[:, 0] = cols.kv_cache_usage
        x[:, 1] = tokens = float(predictions._request.input_tokens_estimate)
        x[:, 2] = cols.waiting_queue_size
        if load is not None:
            x[:, 3] = [load.requests(ep) for ep in endpoints]
            x[:, 5] = [load.tokens(ep) for ep in endpoints]
        else:
            x[:, 3] = cols.running_requests
            x[:, 5] = 0.0
        x[:, 4] = 0.0  # the prefix share: the few matched endpoints' (PrefixMatch.ratio)
        if match is not None and match.total_blocks:
            position = endpoint_positions(endpoints)
            for key, blocks in match.matched.items():
                i = position(key)
                if i is not None:
                    x[i, 4] = blocks / match.total_blocks
        x[:, 6] = tokens * (1.0 - x[:, 4])
        return x

    def predict(self, predictions: LatencyPredictions) -> PredictionTable | None:
        endpoints = predictions._endpoints
        if not endpoints:
            return None
        x = self.features(predictions)
        predictions._rows = {ep.key: i for i, ep in enumerate(endpoints)}
        predictions._x = x
        if not self.predict_in_produce:
            return None
        remote = self.sidecar.models() if self.sidecar is not None else None
        if remote is not None:
            ttft, tpot = remote[0].predict(x), remote[1].predict(x)
        else:
            local_ttft = self.ttft_model.predict(x)
            if local_ttft is None:
                return None
            ttft = local_ttft
            # TPOT before its first fit (or never learned: non-streaming) reads 0.
            local_tpot = self.tpot_model.predict(x) if self.streaming_mode else None
            tpot = local_tpot if local_tpot is not None else np.zeros(len(endpoints))
        ttft_headroom = predictions.ttft_slo_ms - ttft
        if self.streaming_mode:
            budget = np.full(len(endpoints), predictions.tpot_slo_ms * self.slo_buffer_factor)
            if self._running_tpot_slo or self.role_label:
                for i, ep in enumerate(endpoints):
                    if self._is_prefill(ep):
                        budget[i] = np.inf  # TPOT is not incurred there: neutral below
                        continue
                    running = self._running_tpot_slo.get(ep.key)
                    if running:
                        budget[i] = min(budget[i], min(running.values()) * self.slo_buffer_factor)
            tpot_headroom = np.where(np.isinf(budget), 0.0, budget - tpot)
            tpot_ok = (tpot < budget).tolist()
        else:  # TPOT is not learned: neutral
            tpot_headroom = np.zeros(len(endpoints))
            tpot_ok = [True] * len(endpoints)
        return PredictionTable(
            ttft.tolist(),
            tpot.tolist(),
            (ttft < predictions.ttft_slo_ms).tolist(),
            tpot_ok,
            np.asarray(ttft_headroom, dtype=np.float64),
            np.asarray(tpot_headroom, dtype=np.float64),
            np.fromiter((ep.inflight_requests for ep in endpoints), np.float64, len(endpoints)),
        )

    def _is_prefill(self, ep: Endpoint) -> bool:
        return bool(self.role_label) and ep.labels.get(self.role_label) == "prefill"

    # --- learning --------------------------------------------------------------------------------

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        predictions = cycle.read(self.key)
        if predictions is None or not result.primary.endpoints:
            return
        endpoint = result.primary.endpoints[0]
        x = predictions.features_of(endpoint)
        if x is None:
            return
        if len(self._pending) >= _MAX_PENDING:  # the oldest goes, with its TPOT SLO entry
            self._forget(self._pending.pop(next(iter(self._pending))))
        pending = self._pending[id(request)] = _Pending(request, x, endpoint.key, predictions.get(endpoint))
        if self.streaming_mode and predictions.tpot_slo_ms > 0:
            self._running_tpot_slo.setdefault(endpoint.key, {})[id(request)] = predictions.tpot_slo_ms
            pending.slo_at = endpoint.key

    def served_elsewhere(self, request: InferenceRequest, planned: Endpoint, served: Endpoint) -> None:
        """A fallback serves the request: its TPOT SLO now constrains that endpoint's budget."""
        pending = self._pending.get(id(request))
        if pending is None or pending.slo_at != planned.key:
            return
        slo = self._forget(pending)
        if slo is not None:
            self._running_tpot_slo.setdefault(served.key, {})[id(request)] = slo
            pending.slo_at = served.key

    def response_measured(self, request: InferenceRequest, endpoint: Endpoint, stats: ResponseStats) -> None:
        pending = self._pending.get(id(request))
        if pending is None or pending.planned != endpoint.key:
            return  # not picked with a prediction, or a fallback served: the features are another pod's
        x, predicted = pending.x, pending.prediction
        if predicted is not None and self.histograms is not None:
            self.histograms.observe(self, request, predicted, tpot=self.streaming_mode)
        if self.streaming_mode and stats.first_chunk_s > 0:
            ttft_ms = stats.first_chunk_s * 1000.0
        else:
            ttft_ms = stats.e2e_s * 1000.0
        tpot_ms = 0.0
        if self.streaming_mode and stats.streaming and stats.output_tokens > 1 and stats.first_chunk_s > 0:
            tpot_ms = (stats.e2e_s - stats.first_chunk_s) * 1000.0 / (stats.output_tokens - 1)
            self.tpot_model.add(x, tpot_ms)
        self.ttft_model.add(x, ttft_ms)
        if self.sidecar is not None:
            self.sidecar.record(_training_entry(x, ttft_ms, tpot_ms, endpoint, self.role_label))

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        pending = self._pending.pop(id(request), None)
        if pending is not None:
            self._forget(pending)

    def _forget(self, pending: _Pending) -> float | None:
        """Drop a request from its endpoint's running TPOT SLOs; its SLO, if it had one there."""
        running = self._running_tpot_slo.get(pending.slo_at)
        if running is None:
            return None
        slo = running.pop(id(pending.request), None)
        if not running:
            del self._running_tpot_slo[pending.slo_at]
        pending.slo_at = ""
        return slo

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self._running_tpot_slo.pop(endpoint.key, None)

    async def run(self, context: ServiceContext) -> None:
        if self.sidecar is not None:
            await self.sidecar.run()


def _training_entry(
    x: FloatArray, ttft_ms: float, tpot_ms: float, endpoint: Endpoint, role_label: str
) -> dict[str, Any]:
    """An observation in the training server's format (Go's TrainingEntry)."""
    entry: dict[str, Any] = {
        "kv_cache_percentage": float(x[0]),
        "input_token_length": int(x[1]),
        "num_request_waiting": int(x[2]),
        "num_request_running": int(x[3]),
        "num_tokens_generated": 0,
        "actual_ttft_ms": ttft_ms,
        "actual_tpot_ms": tpot_ms,
        "prefix_cache_score": float(x[4]),
        "encoder_input_size": 0,
        "encoder_matched_size": 0,
        "prefill_tokens_in_flight": int(x[5]),
        "decode_tokens_in_flight": 0,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    if role_label and endpoint.labels.get(role_label):
        entry["pod_type"] = endpoint.labels[role_label]
    return entry
