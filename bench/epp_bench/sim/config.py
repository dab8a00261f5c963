"""Knobs of one simulated vLLM instance, with defaults that resemble a 32B-class model on one GPU pod.

Latency defaults (simulated seconds; real seconds = simulated x `time_factor`):

- `prefill_time_per_token_s` = 0.25 ms: ~4,000 uncached prompt tokens/s, what a 32B model on H100s
  prefills. A 2,048-token system prompt costs ~0.5 s when missed and ~0 when cached, which is the
  gap prefix-aware routing is meant to win.
- `prefill_overhead_s` = 15 ms: scheduling + tokenization + the first forward pass's fixed cost.
- `inter_token_latency_s` = 20 ms at batch 1, plus `decode_time_per_seq_s` = 0.1 ms per running
  sequence (decode is memory-bound, so a bigger batch is slower per step: 64 running -> ~26 ms).
- `max_num_batched_tokens` = 2,048: vLLM's chunked-prefill budget per step, so one long prompt
  stretches a few steps instead of freezing every decode for its whole prefill.

P/D: `role` is "both" (serves anything), "prefill" (serves requests and prefills for decode
instances: `kv_transfer_params.do_remote_decode`; refuses remote KV) or "decode" (takes remote KV:
`kv_transfer_params.do_remote_prefill`; refuses to prefill for others). Pulling a prompt's KV from
the prefill pod costs `kv_transfer_latency_s` + `kv_transfer_time_per_token_s` (20 us: ~320 KB of
KV per token of a 70B-class model at ~16 GB/s of RDMA) per token the decode instance lacks.

KV defaults: `kv_cache_blocks` = 2,048 blocks x 16 tokens = 32k tokens (scaled down from a real
pod's ~100k+ so that scaled-down workloads still feel cache pressure), `max_num_seqs` = 256 (vLLM's
default), `max_waiting` = 1,000 (the llm-d simulator's default queue bound; beyond it -> 429).

KV events (off by default; everything above is unchanged without them): `kv_events_config` is
vLLM's `--kv-events-config` JSON (kv_events.py); its topic may hold `{address}` and `{model}`.
`tokenizer` names a Hugging Face tokenizer directory whose ids the engine uses instead of its
4-byte ids. With either, the KV cache is keyed on vLLM's block hashes of the token ids
(block_hash.py), with vLLM's `--prefix-caching-hash-algo` (`prefix_caching_hash_algo`, default
sha256) and `python_hash_seed` (vLLM reads PYTHONHASHSEED; empty here means that variable, and a
random seed when it is unset, as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from epp_bench.sim.block_hash import hash_function
from epp_bench.sim.kv_events import KVEventsConfig

BLOCK_SIZE_TOKENS = 16
CHARS_PER_TOKEN = 4  # the field's tokenizer-free convention; "characters" are UTF-8 bytes here
BLOCK_CHARS = BLOCK_SIZE_TOKENS * CHARS_PER_TOKEN


@dataclass
class SimConfig:
    name: str = "sim-0"
    model: str = "sim-model"
    role: str = "both"  # prefill/decode disaggregation: "both" | "prefill" | "decode"
    kv_cache_blocks: int = 2048
    max_num_seqs: int = 256
    max_waiting: int = 1000
    max_num_batched_tokens: int = 2048
    prefill_overhead_s: float = 0.015
    prefill_time_per_token_s: float = 0.00025
    inter_token_latency_s: float = 0.020
    decode_time_per_seq_s: float = 0.0001
    kv_transfer_latency_s: float = 0.0
    kv_transfer_time_per_token_s: float = 0.00002
    default_max_tokens: int = 16
    # Like vLLM's --stream-interval: streaming clients get a write every N tokens (the first token
    # and the last always go at once). 1 is faithful; 2-4 cut the simulator's CPU roughly as much.
    stream_interval: int = 1
    time_factor: float = 1.0
    # Steps shorter than this (real seconds) run back to back and are flushed together: with a
    # small time_factor the loop would otherwise wake thousands of times a second per instance.
    min_sleep_s: float = 0.004
    # If the loop falls this far (real seconds) behind its schedule (CPU starved), it stops trying
    # to catch up and restarts its clock; `stats.lag_resets` counts it so a bench can flag the run.
    max_lag_s: float = 0.25
    # What GET /version reports (vLLM answers its own release there). Not a vLLM release by default:
    # the simulator follows vLLM's current HTTP surface, not one version of it.
    vllm_version: str = "0.0.0+sim"
    tokenizer: str = ""  # a Hugging Face tokenizer directory; "" = the built-in 4-byte tokenizer
    kv_events_config: str = ""  # vLLM's --kv-events-config JSON; "" = no events
    kv_events_layout: str = "map"  # "map" (vLLM's tagged-map events) or "array" (older array_like)
    # Not vLLM's: more addresses the PUB socket also connects to (comma-separated), e.g. an epp
    # binding its SUB socket while vllm-router subscribes to the endpoint the instance binds.
    kv_events_connect: str = ""
    prefix_caching_hash_algo: str = "sha256"
    python_hash_seed: str = ""  # "" = the PYTHONHASHSEED environment variable, random when unset

    @property
    def vllm_block_keys(self) -> bool:
        """Whether the KV cache is keyed on vLLM's block hashes of token ids."""
        return bool(self.tokenizer or self.kv_events_config.strip())

    def validate(self) -> None:
        positive = {
            "kv_cache_blocks": self.kv_cache_blocks,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "default_max_tokens": self.default_max_tokens,
            "stream_interval": self.stream_interval,
            "max_waiting": self.max_waiting,  # every request passes through the queue, even briefly
            "time_factor": self.time_factor,
            "inter_token_latency_s": self.inter_token_latency_s,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
        non_negative = {
            "prefill_overhead_s": self.prefill_overhead_s,
            "prefill_time_per_token_s": self.prefill_time_per_token_s,
            "decode_time_per_seq_s": self.decode_time_per_seq_s,
            "kv_transfer_latency_s": self.kv_transfer_latency_s,
            "kv_transfer_time_per_token_s": self.kv_transfer_time_per_token_s,
            "min_sleep_s": self.min_sleep_s,
            "max_lag_s": self.max_lag_s,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{key} must not be negative, got {value}")
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if self.kv_events_layout not in ("map", "array"):
            raise ValueError(f"kv_events_layout must be map or array, got {self.kv_events_layout!r}")
        hash_function(self.prefix_caching_hash_algo)  # ValueError for an unknown one
        if self.tokenizer and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer: no tokenizer.json in {self.tokenizer}")
        KVEventsConfig.parse(self.kv_events_config)
