"""The step loop of one simulated instance, shaped like vLLM v1's engine core.

One asyncio task per instance runs steps; nothing runs per token or per request. Each step:

1. Admit from the FIFO waiting queue while there is a free slot (`max_num_seqs`) and the KV cache can
   hold the head request (prefix hits + blocks for the rest of its prompt and all of its output).
   The head blocks the queue when it doesn't fit, as in vLLM.
2. Plan one batch under the chunked-prefill token budget (`max_num_batched_tokens`): every decoding
   request takes 1 token, what is left goes to prefilling requests in admission order.
3. Step duration (simulated) = max(decode time, prefill work), one forward pass being bounded by
   memory (decode) or by compute (prefill tokens):
       decode time  = inter_token_latency_s + decode_time_per_seq_s x decoding requests
       prefill work = prefill_overhead_s x requests starting prefill + prompt tokens x per-token time
   Cached prompt tokens cost nothing. So a lone request sees TTFT = max(ITL, overhead + uncached x
   per-token) and then one token per ITL, while a long prefill slows everyone's step, as on a GPU.
4. Sleep once until the step's end (real time = simulated x time_factor), then apply it: decoding
   requests get one token, requests whose prefill completes get their first token, finished ones
   release their KV blocks (which stay cached, with the full blocks of their output added).

Prefill/decode disaggregation (decode side): a request marked `remote_prefill` (vLLM's
`kv_transfer_params.do_remote_prefill`) was prefilled on a prefill instance. At admission it gets
its KV blocks as usual, then waits, off the batch and without compute, for the blocks it does not
hold locally to arrive: kv_transfer_latency_s + kv_transfer_time_per_token_s x uncached prompt
tokens. It then joins the batch, computes only its last prompt token (no prefill overhead) and
decodes. While its KV is in flight it counts as waiting, as in vLLM.

Handlers are woken through one asyncio.Event per request and write everything that arrived since
their last write in one go, so a client that falls behind, or several short steps run back to back
(steps shorter than `min_sleep_s` are not slept individually), cost one write, not one per token.
`stream_interval` > 1 wakes streaming handlers only every N tokens (vLLM's --stream-interval).
When nothing is queued or running the loop awaits an event and uses no CPU.

KV events (config.py, kv_events.py): the KV cache is keyed on vLLM's block hashes of the prompt's
token ids. Blocks a request newly caches at admission (vLLM caches a block when it is scheduled for
computation) and the full blocks its answer filled (cached at the end) are reported as BlockStored,
evicted ones as BlockRemoved; each step's events go out as one batch after the step. A prefix-cache
reset that empties the cache is AllBlocksCleared (vLLM's), one that leaves referenced blocks is
BlockRemoved of what it dropped. `restart` is a pod restart: requests fail, the cache and the
publisher's sequence start again, and the first batch is AllBlocksCleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp_bench.sim.block_hash import BlockHasher, external
from epp_bench.sim.config import BLOCK_CHARS, BLOCK_SIZE_TOKENS, SimConfig
from epp_bench.sim.kv_cache import Allocation, BlockKey, KVCache
from epp_bench.sim.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventsConfig,
    ZmqEventPublisher,
)
from epp_bench.sim.text import answer_bytes, answer_seed, block_hashes, count_tokens, model_seed, prev_bytes
from epp_bench.sim.token_source import TokenSource, token_source

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED, ABORTED = "waiting", "running", "finished", "aborted"
TRANSFERRING = "transferring"  # admitted with remote prefill: its KV is arriving from a prefill pod


class QueueFull(Exception):
    """The waiting queue is at `max_waiting`: the server answers 429."""


class RequestTooLarge(ValueError):
    """The request could never fit in the KV cache: the server answers 400."""


@dataclass
class SimStats:
    """Plain counters, read by /metrics and by benchmarks (token counts are in tokens)."""

    requests_received: int = 0
    requests_rejected: int = 0  # 429, queue full
    requests_aborted: int = 0  # client went away, or the simulator stopped
    requests_succeeded: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    steps: int = 0
    lag_resets: int = 0
    peak_running: int = 0
    peak_waiting: int = 0

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class SimRequest:
    """One generation request as the engine tracks it. Times are real event-loop seconds."""

    __slots__ = (
        "alloc",
        "answer_seed",
        "arrival",
        "cached_tokens",
        "chunk",
        "error",
        "finished_at",
        "first_token_at",
        "generated",
        "hashes",
        "max_tokens",
        "notified",
        "prefill_left",
        "prefill_started",
        "prompt",
        "prompt_tokens",
        "ready_at",
        "remote_prefill",
        "rid",
        "state",
        "stream",
        "token_ids",
        "wakeup",
    )

    def __init__(
        self,
        rid: str,
        prompt: bytes,
        max_tokens: int,
        stream: bool,
        seed: bytes,
        remote_prefill: bool = False,
        keyed: tuple[list[int], list[bytes]] | None = None,
    ) -> None:
        self.rid = rid
        self.remote_prefill = remote_prefill  # P/D: the prompt's KV comes from a prefill pod
        self.ready_at = 0.0  # when that KV has arrived (real loop time)
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.stream = stream
        # With vLLM block keys (`keyed`): the prompt's token ids and vLLM's hashes of its full blocks.
        self.token_ids: list[int] | None = None
        self.hashes: Sequence[BlockKey]
        if keyed is None:
            self.prompt_tokens = count_tokens(prompt)
            self.hashes = block_hashes(prompt, seed)  # full 64-byte blocks of the prompt
        else:
            self.token_ids, self.hashes = keyed
            self.prompt_tokens = len(self.token_ids)
        self.answer_seed = answer_seed(prompt)
        self.arrival = 0.0
        self.state = WAITING
        self.alloc: Allocation | None = None
        self.cached_tokens = 0
        self.prefill_left = 0
        self.prefill_started = False
        self.chunk = 0  # prompt tokens computed in the step being run
        self.generated = 0
        self.notified = 0  # `generated` when the handler was last woken
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: str | None = None
        self.wakeup = asyncio.Event()

    @property
    def total_blocks(self) -> int:
        return -(-(self.prompt_tokens + self.max_tokens) // BLOCK_SIZE_TOKENS)

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, ABORTED)


@dataclass
class Observers:
    """Per-request hooks (histograms); called once per request, never per token. `itl` gets a
    finished request's mean gap between output tokens and how many gaps it had."""

    queue_time: Callable[[float], None] = lambda s: None
    ttft: Callable[[float], None] = lambda s: None
    e2e: Callable[[float], None] = lambda s: None
    itl: Callable[[float, int], None] = lambda s, n: None


class Engine:
    def __init__(self, cfg: SimConfig, observers: Observers | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.stats = SimStats()
        self.tokens: TokenSource = token_source(cfg.tokenizer)
        self.events_cfg = KVEventsConfig.parse(cfg.kv_events_config)
        self.publisher: ZmqEventPublisher | None = None
        self._events: list[KVEvent] = []
        self._hasher = (
            BlockHasher(cfg.prefix_caching_hash_algo, cfg.python_hash_seed or None, BLOCK_SIZE_TOKENS)
            if cfg.vllm_block_keys
            else None
        )
        self._answer_ids = self.tokens.answer_ids()
        self.kv = KVCache(cfg.kv_cache_blocks, journal=self.events_cfg.enabled)
        self.observers = observers or Observers()
        self._seed = model_seed(cfg.model)
        self._waiting: deque[SimRequest] = deque()
        self._prefilling: list[SimRequest] = []  # admission order
        self._decoding: list[SimRequest] = []
        self._transferring: list[SimRequest] = []  # KV blocks allocated, remote KV in flight
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self.broken = False

    @property
    def vllm_block_keys(self) -> bool:
        """The KV cache is keyed on vLLM's block hashes of token ids (events on, or a tokenizer)."""
        return self._hasher is not None

    # -- state read by /metrics -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_waiting(self) -> int:
        # vLLM keeps a request whose KV is still arriving from a prefill pod in its waiting queue.
        return len(self._waiting) + len(self._transferring)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, address: str = "") -> None:
        """Start the step loop and open the KV event sockets (OSError when they cannot bind). In
        the events' topic, `{address}` becomes `address` and `{model}` the model name: one
        config gives several instances in one process topics of their own, as llm-d's
        `kv@<pod>@<model>`."""
        if self.events_cfg.enabled and self.publisher is None:
            topic = self.events_cfg.topic.replace("{address}", address).replace("{model}", self.cfg.model)
            connect = [e.strip() for e in self.cfg.kv_events_connect.split(",") if e.strip()]
            self.publisher = ZmqEventPublisher(self.events_cfg, self.cfg.kv_events_layout, topic, connect)
            self.publisher.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"sim-engine-{self.cfg.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for req in [*self._waiting, *self._transferring, *self._prefilling, *self._decoding]:
            self._drop(req, "simulator stopped")
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            await publisher.close()

    # -- requests -------------------------------------------------------------------------------------
    def new_request(
        self,
        prompt: str,
        max_tokens: int,
        stream: bool,
        remote_prefill: bool = False,
        token_ids: list[int] | None = None,
        cache_salt: str | None = None,
    ) -> SimRequest:
        """A request to submit. `remote_prefill` (P/D decode side): the prompt was prefilled on
        another instance; its KV is transferred instead of computed. `token_ids`: the prompt as ids
        (with vLLM block keys they are used as given; `prompt` is then their text). `cache_salt`:
        vLLM's, an extra key of the first block's hash (with vLLM block keys)."""
        rid = f"{self.cfg.name}-{next(self._ids)}"
        keyed = None
        if self._hasher is not None:
            ids = token_ids if token_ids is not None else self.tokens.encode(prompt)
            keyed = (ids, self._hasher.hashes(ids, cache_salt=cache_salt))
        return SimRequest(rid, prompt.encode(), max_tokens, stream, self._seed, remote_prefill, keyed)

    def submit(self, req: SimRequest) -> None:
        """Queue a request; raises RequestTooLarge or QueueFull instead of queueing it."""
        if self.broken:
            raise RuntimeError(f"simulator {self.cfg.name}: engine loop crashed")
        self.stats.requests_received += 1
        if req.total_blocks > self.kv.num_blocks:
            raise RequestTooLarge(
                f"request needs {req.total_blocks} KV blocks ({req.prompt_tokens} prompt + {req.max_tokens}"
                f" output tokens) but the cache has {self.kv.num_blocks}"
            )
        if len(self._waiting) >= self.cfg.max_waiting:
            self.stats.requests_rejected += 1
            raise QueueFull(f"waiting queue is full ({self.cfg.max_waiting} requests)")
        req.arrival = asyncio.get_running_loop().time()
        self._waiting.append(req)
        self.stats.peak_waiting = max(self.stats.peak_waiting, len(self._waiting))
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: free its slot and blocks now, as vLLM aborts on disconnect."""
        if not req.done:
            self._drop(req, "aborted")

    def reset_prefix_cache(self) -> int:
        dropped = self.kv.reset()
        if self.kv.journal:
            removed = self._drain_removed()
            if self.kv.cached_blocks == 0:
                self._events.append(AllBlocksCleared())
            elif removed:
                self._events.append(BlockRemoved(removed))
            self._flush_events()
        return dropped

    def restart(self) -> None:
        """A pod restart: every request fails, the KV cache starts empty, and the KV event stream
        starts again (sequence 0) with AllBlocksCleared. Stats keep counting."""
        for req in [*self._waiting, *self._transferring, *self._prefilling, *self._decoding]:
            self._drop(req, "simulator restarted")
        self.kv = KVCache(self.cfg.kv_cache_blocks, journal=self.events_cfg.enabled)
        self._events.clear()
        if self.publisher is not None:
            self.publisher.restart()
            self.publisher.publish([AllBlocksCleared()])

    # -- KV events ------------------------------------------------------------------------------------
    def _drain_removed(self) -> list[bytes | int]:
        as_int = self._int_hashes
        removed = [external(h, as_int) for h in self.kv.removed if isinstance(h, bytes)]
        self.kv.removed.clear()
        return removed

    @property
    def _int_hashes(self) -> bool:
        # vLLM's VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES (default 1): the low 64 bits as an integer.
        return os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") != "0"

    def _note_stored(
        self, hashes: Sequence[BlockKey], first_block: int, token_ids: Sequence[int], parent: BlockKey | None
    ) -> None:
        """BlockRemoved for what the last KV call evicted, then one BlockStored per run of blocks it
        newly cached. `hashes[i]` is block `first_block + i` of `token_ids`; `parent` is the hash of
        block `first_block - 1` (None at the start of the sequence)."""
        kv = self.kv
        if kv.removed:
            self._events.append(BlockRemoved(self._drain_removed()))
        if not kv.stored:
            return
        as_int, size = self._int_hashes, BLOCK_SIZE_TOKENS
        runs: list[list[int]] = []
        for i in kv.stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            start, end = run[0], run[-1] + 1
            before = hashes[start - 1] if start > 0 else parent
            self._events.append(
                BlockStored(
                    block_hashes=[external(h, as_int) for h in hashes[start:end] if isinstance(h, bytes)],
                    parent_block_hash=external(before, as_int) if isinstance(before, bytes) else None,
                    token_ids=list(token_ids[(first_block + start) * size : (first_block + end) * size]),
                    block_size=size,
                )
            )

    def _flush_events(self) -> None:
        if self._events and self.publisher is not None:
            self.publisher.publish(self._events)
        self._events = []

    # -- the loop -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception:
            # A bug must not leave clients hanging: fail what is queued and refuse new work.
            log.exception("simulator %s: engine loop crashed", self.cfg.name)
            self.broken = True
            for req in [*self._waiting, *self._transferring, *self._prefilling, *self._decoding]:
                self._drop(req, "failed: simulator engine crashed")
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        clock = loop.time()
        unslept = 0
        while True:
            if not self._waiting and not self.num_running and not self._transferring:
                self._wake.clear()
                await self._wake.wait()
                clock = loop.time()  # idle time is not simulated: restart the clock
            self._admit(clock)
            if not self.num_running:
                if self._transferring:  # nothing to compute until a KV transfer lands
                    await self._await_transfer(loop)
                    clock = loop.time()
                    continue
                # Cannot happen: an empty cache fits any accepted request.
                self._drop(self._waiting[0], "cannot be scheduled")
                continue
            clock += self._plan() * cfg.time_factor
            delay = clock - loop.time()
            if delay >= cfg.min_sleep_s:
                unslept = 0
                await asyncio.sleep(delay)
            else:
                if delay < -cfg.max_lag_s:  # CPU-starved: give up catching up rather than burst
                    clock = loop.time()
                    self.stats.lag_resets += 1
                unslept += 1
                if unslept >= 32:  # short steps run back to back, but let handlers write sometimes
                    unslept = 0
                    await asyncio.sleep(0)
            self._apply(clock)
            if self._events:
                self._flush_events()

    async def _await_transfer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep until the first KV transfer lands, or a new request arrives."""
        delay = min(req.ready_at for req in self._transferring) - loop.time()
        if delay <= 0:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # not wait_for: on 3.11 it can swallow a cancel
                await self._wake.wait()

    def _admit(self, now: float) -> None:
        cfg, kv, stats = self.cfg, self.kv, self.stats
        if self._transferring:
            # A request whose KV has arrived joins the batch when a slot is free. Its last prompt
            # token is computed here (the forward pass that samples its first token), with no
            # per-request prefill overhead: the prefill pod paid it.
            arrived = [r for r in self._transferring if r.ready_at <= now]
            for req in arrived:
                if self.num_running >= cfg.max_num_seqs:
                    break
                self._transferring.remove(req)
                req.state = RUNNING
                self._prefilling.append(req)
        while self._waiting and self.num_running < cfg.max_num_seqs:
            req = self._waiting[0]
            # vLLM recomputes at least the last prompt token, so a full hit stops one token short.
            max_hit = (req.prompt_tokens - 1) // BLOCK_SIZE_TOKENS
            hit = kv.match(req.hashes, max_hit)
            alloc = kv.allocate(req.hashes, hit, req.total_blocks)
            if alloc is None:
                break  # FIFO: the head waits for blocks, the rest wait behind it
            self._waiting.popleft()
            if kv.journal and req.token_ids is not None:
                self._note_stored(req.hashes, 0, req.token_ids, None)
            req.alloc = alloc
            req.cached_tokens = hit * BLOCK_SIZE_TOKENS
            stats.prefix_cache_queries += req.prompt_tokens
            stats.prefix_cache_hits += req.cached_tokens
            if req.remote_prefill:
                # The blocks this instance does not hold come over the network from the prefill
                # pod (vLLM's NIXL connector pulls only what the local prefix cache misses).
                transfer_s = cfg.kv_transfer_latency_s + cfg.kv_transfer_time_per_token_s * (
                    req.prompt_tokens - req.cached_tokens
                )
                req.state = TRANSFERRING
                req.prefill_left = 1 if req.prompt_tokens else 0
                req.prefill_started = True
                req.ready_at = now + transfer_s * cfg.time_factor
                self._transferring.append(req)
            else:
                req.state = RUNNING
                req.prefill_left = req.prompt_tokens - req.cached_tokens
                self._prefilling.append(req)
            self.observers.queue_time((max(0.0, now - req.arrival)) / cfg.time_factor)
        stats.peak_running = max(stats.peak_running, self.num_running)

    def _plan(self) -> float:
        """Choose this step's prefill chunks; return its simulated duration."""
        cfg = self.cfg
        decoding = len(self._decoding)
        budget = cfg.max_num_batched_tokens - decoding
        prefill_tokens = 0
        starts = 0
        for req in self._prefilling:
            chunk = min(req.prefill_left, budget) if budget > 0 else 0
            req.chunk = chunk
            if chunk:
                budget -= chunk
                prefill_tokens += chunk
                if not req.prefill_started:
                    req.prefill_started = True
                    starts += 1
        decode_s = cfg.inter_token_latency_s + cfg.decode_time_per_seq_s * decoding
        prefill_s = cfg.prefill_overhead_s * starts + cfg.prefill_time_per_token_s * prefill_tokens
        return max(decode_s, prefill_s)

    def _apply(self, now: float) -> None:
        """The step ends at `now`: hand out its tokens and retire finished requests."""
        stats = self.stats
        stats.steps += 1
        interval = self.cfg.stream_interval
        tokens = 0
        keep: list[SimRequest] = []
        for req in self._decoding:
            req.generated += 1
            tokens += 1
            if req.generated >= req.max_tokens:
                self._finish(req, now)
            else:
                keep.append(req)
                if req.stream and req.generated - req.notified >= interval:
                    req.notified = req.generated
                    req.wakeup.set()
        still_prefilling: list[SimRequest] = []
        for req in self._prefilling:
            if req.chunk:
                req.prefill_left -= req.chunk
                req.chunk = 0
            if req.prefill_left > 0:
                still_prefilling.append(req)
                continue
            # The prefill's forward pass samples the first token.
            req.generated = 1
            req.first_token_at = now
            tokens += 1
            stats.prompt_tokens += req.prompt_tokens
            self.observers.ttft((now - req.arrival) / self.cfg.time_factor)
            if req.max_tokens <= 1:
                self._finish(req, now)
            else:
                keep.append(req)
                if req.stream:
                    req.notified = 1
                    req.wakeup.set()
        stats.generation_tokens += tokens
        self._decoding = keep
        self._prefilling = still_prefilling

    def _finish(self, req: SimRequest, now: float) -> None:
        req.state = FINISHED
        req.finished_at = now
        if req.alloc is not None:
            completed = self._generated_block_hashes(req)
            self.kv.release(req.alloc, completed)
            req.alloc = None
            if self.kv.journal and req.token_ids is not None:
                parent = req.hashes[-1] if req.hashes else None
                self._note_stored(completed, len(req.hashes), self._all_token_ids(req), parent)
        self.stats.requests_succeeded += 1
        self.observers.e2e((now - req.arrival) / self.cfg.time_factor)
        if req.generated > 1 and req.first_token_at:
            gaps = req.generated - 1
            self.observers.itl((now - req.first_token_at) / self.cfg.time_factor / gaps, gaps)
        req.wakeup.set()

    def _all_token_ids(self, req: SimRequest) -> list[int]:
        """Prompt + answer token ids (vLLM's all_token_ids) of a request with token ids."""
        words, seed = self._answer_ids, req.answer_seed
        answer = [words[(seed + i) % len(words)] for i in range(req.generated)]
        return [*(req.token_ids or ()), *answer]

    def _generated_block_hashes(self, req: SimRequest) -> Sequence[BlockKey]:
        """Hashes of the full blocks past the prompt's, over prompt + answer (text, or token ids)."""
        first = len(req.hashes)
        if self._hasher is not None:
            ids = self._all_token_ids(req)
            if len(ids) // BLOCK_SIZE_TOKENS <= first:
                return []
            parent = req.hashes[-1] if req.hashes else None
            return self._hasher.hashes(ids, parent if isinstance(parent, bytes) else None, start_block=first)
        text = req.prompt + answer_bytes(req.answer_seed, req.generated)
        if len(text) // BLOCK_CHARS <= first:
            return []
        last = req.hashes[-1] if req.hashes else None
        seed = prev_bytes(last) if isinstance(last, int) else self._seed
        return block_hashes(text, seed, start_block=first)

    def _drop(self, req: SimRequest, reason: str) -> None:
        if req.state == WAITING:
            with contextlib.suppress(ValueError):
                self._waiting.remove(req)
        elif req.state == TRANSFERRING:
            self._transferring.remove(req)
            if req.alloc is not None:
                self.kv.release(req.alloc)
                req.alloc = None
        elif req.state == RUNNING:
            if req in self._decoding:
                self._decoding.remove(req)
            elif req in self._prefilling:
                self._prefilling.remove(req)
            if req.alloc is not None:
                self.kv.release(req.alloc)
                req.alloc = None
        req.state = ABORTED
        req.error = reason
        self.stats.requests_aborted += 1
        req.wakeup.set()
