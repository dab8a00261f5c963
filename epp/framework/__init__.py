"""The public plugin API: everything a plugin author needs, and all that `epp_scorers` (the
in-tree plugins) imports from epp.

- data model: `Endpoint`, `EndpointMetrics`, `InferenceRequest`, `Api`, `ProfileResult`,
  `SchedulingResult`, `ROLE_LABEL`; `Scores` (a list or a numpy array, one per candidate)
- `metric_columns(endpoints)`: the candidates' scraped metrics as numpy arrays (`MetricColumns`,
  `Column`), for scorers that score every candidate at once; `endpoint_positions(endpoints)`,
  an endpoint key's index among them; `SMALL_POOL_SIZE`, up to which plain lists are faster;
  `PerTuple`, what a plugin derives from a tuple of candidates kept with the tuple
- cycle state: `CycleState`, `DataKey[T]`
- parameters: `Params`, `ConfigError`, `ParamDoc`
- plugin bases (a plugin's kind is its base class): `Filter`, `Scorer`, `Picker`,
  `ProfileHandler`, `DataProducer`, `PdDecider`, `Parser`, `DataSource`; lifecycle hooks
  `PreRequest`, `ResponseHeaders`, `ServedElsewhere`, `ResponseMeasured` (with `ResponseStats`),
  `ResponseComplete`, `EndpointListener`;
  flow control and admission `SaturationDetector`, `OrderingPolicy`, `FairnessPolicy`,
  `Admitter`, `UsageLimitPolicy` (with `FlowItem`, a queued request, and `FlowQueue`, a flow's
  queue); `fairness_id(headers)`, a request's flow; `bounded_id(value, max_chars)`, a
  client-chosen id kept by its hash when long
- `PluginHandle`: metrics, the `InFlightLedger`, peers by name; `LeanHistogram` and its series
  `HistogramChild` (`PluginHandle.lean_histogram`: a histogram for the request path)
- `PluginRegistry`: what an `epp.plugins` entry point's register function receives
- `EppError` / `ErrorCode`: fail a request with an HTTP status
"""

from epp.errors import ConfigError, EppError, ErrorCode
from epp.framework.client_ids import bounded_id
from epp.framework.columns import SMALL_POOL_SIZE, Column, MetricColumns, endpoint_positions, metric_columns
from epp.framework.cycle import CycleState, DataKey
from epp.framework.datamodel import (
    EMPTY_METRICS,
    ROLE_LABEL,
    Api,
    Endpoint,
    EndpointMetrics,
    InferenceRequest,
    ProfileResult,
    SchedulingResult,
    Scores,
)
from epp.framework.fairness import fairness_id
from epp.framework.handle import PluginHandle
from epp.framework.histogram import HistogramChild, LeanHistogram
from epp.framework.inflight import InFlightLedger
from epp.framework.labels import CappedChildren
from epp.framework.logs import LogLimiter
from epp.framework.params import Params
from epp.framework.plugin import (
    Admitter,
    BackgroundService,
    DataProducer,
    DataSource,
    EndpointListener,
    FairnessPolicy,
    Filter,
    FlowItem,
    FlowQueue,
    OrderingPolicy,
    ParamDoc,
    Parser,
    PdDecider,
    Picker,
    Plugin,
    PluginKind,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseHeaders,
    ResponseMeasured,
    ResponseStats,
    SaturationDetector,
    Scorer,
    ServedElsewhere,
    ServiceContext,
    UsageLimitPolicy,
)
from epp.framework.registry import ENTRY_POINT_GROUP, PluginRegistry
from epp.framework.tuples import PerTuple

__all__ = [
    "EMPTY_METRICS",
    "ENTRY_POINT_GROUP",
    "ROLE_LABEL",
    "SMALL_POOL_SIZE",
    "Admitter",
    "Api",
    "BackgroundService",
    "CappedChildren",
    "Column",
    "ConfigError",
    "CycleState",
    "DataKey",
    "DataProducer",
    "DataSource",
    "Endpoint",
    "EndpointListener",
    "EndpointMetrics",
    "EppError",
    "ErrorCode",
    "FairnessPolicy",
    "Filter",
    "FlowItem",
    "FlowQueue",
    "HistogramChild",
    "InFlightLedger",
    "InferenceRequest",
    "LeanHistogram",
    "LogLimiter",
    "MetricColumns",
    "OrderingPolicy",
    "ParamDoc",
    "Params",
    "Parser",
    "PdDecider",
    "PerTuple",
    "Picker",
    "Plugin",
    "PluginHandle",
    "PluginKind",
    "PluginRegistry",
    "PreRequest",
    "ProfileHandler",
    "ProfileResult",
    "ResponseComplete",
    "ResponseHeaders",
    "ResponseMeasured",
    "ResponseStats",
    "SaturationDetector",
    "SchedulingResult",
    "Scorer",
    "Scores",
    "ServedElsewhere",
    "ServiceContext",
    "UsageLimitPolicy",
    "bounded_id",
    "endpoint_positions",
    "fairness_id",
    "metric_columns",
]
