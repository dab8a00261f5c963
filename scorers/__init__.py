"""In-tree scorers. Each is one small class against the public API in `epp.framework`."""

from scorers.kv_cache import KvCacheUtilizationScorer
from scorers.prefix_cache import PrefixCacheScorer
from scorers.queue import QueueScorer

ALL_SCORERS = (QueueScorer, KvCacheUtilizationScorer, PrefixCacheScorer)

__all__ = ["ALL_SCORERS", "KvCacheUtilizationScorer", "PrefixCacheScorer", "QueueScorer"]
