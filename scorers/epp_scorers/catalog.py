"""Every in-tree plugin class, for `register` and the generated reference (docs/plugins.md)."""

from epp_scorers.admitters.latency_slo import LatencySloAdmitter
from epp_scorers.admitters.probabilistic import ProbabilisticAdmitter
from epp_scorers.datasources.endpoint_notification import EndpointNotificationSource
from epp_scorers.datasources.metrics import CoreMetricsExtractor, MetricsDataSource
from epp_scorers.deciders.always import AlwaysDisaggPDDecider
from epp_scorers.deciders.prefix_based import PrefixBasedPDDecider
from epp_scorers.filters.labels import ByLabel, ByLabelSelector, LabelSelectorFilter
from epp_scorers.filters.prefix_affinity import PrefixCacheAffinityFilter
from epp_scorers.filters.roles import DecodeFilter, EncodeFilter, PrefillFilter
from epp_scorers.filters.slo_headroom_tier import SloHeadroomTierFilter
from epp_scorers.flow_policies.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from epp_scorers.flow_policies.ordering import EdfOrderingPolicy, FcfsOrderingPolicy
from epp_scorers.flow_policies.program_aware import ProgramAwareFairness
from epp_scorers.flow_policies.slo_deadline import SloDeadlineOrderingPolicy
from epp_scorers.flow_policies.usage_limits import (
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    StaticUsageLimitPolicy,
)
from epp_scorers.parsers.openai import OpenAIParser, VllmHttpParser
from epp_scorers.pickers.max_score import MaxScorePicker
from epp_scorers.pickers.uniform_random import RandomPicker
from epp_scorers.pickers.weighted_random import WeightedRandomPicker
from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer
from epp_scorers.producers.inflight import InFlightLoadProducer
from epp_scorers.producers.precise_prefix import PrecisePrefixCacheProducer
from epp_scorers.producers.predicted_latency import PredictedLatencyProducer
from epp_scorers.producers.tokenizer import TokenizerPlugin, TokenProducer
from epp_scorers.profile_handlers.disagg import (
    DisaggHeadersHandler,
    DisaggProfileHandler,
    PdProfileHandler,
    PrefillHeaderHandler,
)
from epp_scorers.profile_handlers.single import SingleProfileHandler
from epp_scorers.saturation_detectors.concurrency import ConcurrencyDetector
from epp_scorers.saturation_detectors.utilization import UtilizationDetector
from epp_scorers.scorers.active_request import ActiveRequestScorer
from epp_scorers.scorers.kv_cache import KvCacheUtilizationScorer
from epp_scorers.scorers.latency import LatencyScorer
from epp_scorers.scorers.load_aware import LoadAwareScorer
from epp_scorers.scorers.lora_affinity import LoraAffinityScorer
from epp_scorers.scorers.no_hit_lru import NoHitLruScorer
from epp_scorers.scorers.precise_prefix import PrecisePrefixCacheScorer
from epp_scorers.scorers.prefix_cache import PrefixCacheScorer
from epp_scorers.scorers.queue import QueueScorer, RunningRequestsSizeScorer
from epp_scorers.scorers.session_affinity import SessionAffinityScorer
from epp_scorers.scorers.token_load import TokenLoadScorer

ALL_PLUGINS = (
    # scorers
    QueueScorer,
    RunningRequestsSizeScorer,
    KvCacheUtilizationScorer,
    LoadAwareScorer,
    ActiveRequestScorer,
    TokenLoadScorer,
    LoraAffinityScorer,
    SessionAffinityScorer,
    PrefixCacheScorer,
    NoHitLruScorer,
    PrecisePrefixCacheScorer,
    LatencyScorer,
    # producers
    ApproxPrefixCacheProducer,
    InFlightLoadProducer,
    PrecisePrefixCacheProducer,
    TokenizerPlugin,
    TokenProducer,
    PredictedLatencyProducer,
    # filters
    LabelSelectorFilter,
    DecodeFilter,
    PrefillFilter,
    EncodeFilter,
    PrefixCacheAffinityFilter,
    SloHeadroomTierFilter,
    ByLabel,
    ByLabelSelector,
    # pickers
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    # profile handlers and P/D deciders
    SingleProfileHandler,
    DisaggProfileHandler,
    PdProfileHandler,
    DisaggHeadersHandler,
    PrefillHeaderHandler,
    PrefixBasedPDDecider,
    AlwaysDisaggPDDecider,
    # flow control and admission
    UtilizationDetector,
    ConcurrencyDetector,
    FcfsOrderingPolicy,
    EdfOrderingPolicy,
    SloDeadlineOrderingPolicy,
    GlobalStrictFairnessPolicy,
    RoundRobinFairnessPolicy,
    ProgramAwareFairness,
    StaticUsageLimitPolicy,
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    ProbabilisticAdmitter,
    LatencySloAdmitter,
    # Go types epp covers natively
    OpenAIParser,
    VllmHttpParser,
    MetricsDataSource,
    CoreMetricsExtractor,
    # KV events (precise prefix-cache routing)
    EndpointNotificationSource,
)
