"""In-tree scorers and the data producers they read. Each is one small class against the public
plugin API in `epp.framework`."""

from scorers.active_request import ActiveRequestScorer
from scorers.inflight import InFlightLoadProducer
from scorers.kv_cache import KvCacheUtilizationScorer
from scorers.load_aware import LoadAwareScorer
from scorers.lora_affinity import LoraAffinityScorer
from scorers.no_hit_lru import NoHitLruScorer
from scorers.prefix_cache import ApproxPrefixCacheProducer, PrefixCacheScorer
from scorers.queue import QueueScorer, RunningRequestsSizeScorer
from scorers.session_affinity import SessionAffinityScorer
from scorers.token_load import TokenLoadScorer

ALL_SCORERS = (
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
)
ALL_PRODUCERS = (ApproxPrefixCacheProducer, InFlightLoadProducer)

__all__ = [
    "ALL_PRODUCERS",
    "ALL_SCORERS",
    "ActiveRequestScorer",
    "ApproxPrefixCacheProducer",
    "InFlightLoadProducer",
    "KvCacheUtilizationScorer",
    "LoadAwareScorer",
    "LoraAffinityScorer",
    "NoHitLruScorer",
    "PrefixCacheScorer",
    "QueueScorer",
    "RunningRequestsSizeScorer",
    "SessionAffinityScorer",
    "TokenLoadScorer",
]
