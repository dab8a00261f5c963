"""`python -m epp_bench memory`: the prefix index's memory per (block, endpoint) entry.

Fills one prefix index, in this process, as a pool of `--pods` pods each holding `--blocks`
blocks (the Go EPP's default LRU capacity, 31,250) would: requests of 32 random blocks, each
recorded for one pod, a share of them (`--shared`) for a second pod too (P/D: prefill and decode
hold the same blocks). Reports the process's RSS growth per entry (what the index really costs,
its hash values included) and the index's own estimate (`approx_bytes`, what its byte cap
counts).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path
from typing import Any

from epp_bench.perf import machine, rss_bytes, table, write_json

COLUMNS = (
    ("pods", "pods", ",d"),
    ("blocks_per_pod", "blocks/pod", ",d"),
    ("entries", "entries", ",d"),
    ("bytes_per_entry", "bytes/entry (RSS)", ".1f"),
    ("estimate_bytes_per_entry", "bytes/entry (estimate)", ".1f"),
    ("rss_mb", "RSS MB", ",.0f"),
    ("add_us_per_block", "add us/block", ".2f"),
)
BLOCKS_PER_REQUEST = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=100, help="default 100")
    p.add_argument("--blocks", type=int, default=31_250, help="blocks per pod (default 31250)")
    p.add_argument(
        "--shared", type=float, default=0.0, help="share of requests also held by a second pod (0..1)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the JSON here")


def measure(pods: int, blocks: int, shared: float, seed: int) -> dict[str, Any]:
    from epp_scorers.producers.prefix_index import PrefixIndex

    if pods <= 0 or blocks <= 0 or not 0.0 <= shared <= 1.0:
        raise SystemExit("epp_bench memory: --pods and --blocks must be positive, --shared within 0..1")
    rng = random.Random(seed)
    keys = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(pods)]
    requests = -(-blocks // BLOCKS_PER_REQUEST)
    gc.collect()
    before = rss_bytes()
    index = PrefixIndex(blocks, max_capacity=blocks, max_entries=10**10, max_bytes=10**13)
    started = time.perf_counter()
    added = 0
    for _ in range(requests):
        for p, key in enumerate(keys):
            hashes = [rng.getrandbits(64) for _ in range(BLOCKS_PER_REQUEST)]
            index.add(key, hashes)
            added += len(hashes)
            if shared and rng.random() < shared:
                index.add(keys[(p + 1) % pods], hashes)
                added += len(hashes)
    took = time.perf_counter() - started
    gc.collect()
    used = rss_bytes() - before
    entries = index.entries()
    return {
        "pods": pods,
        "blocks_per_pod": blocks,
        "shared": shared,
        "entries": entries,
        "distinct_blocks": len(index),
        "bytes_per_entry": round(used / entries, 1),
        "estimate_bytes_per_entry": round(index.approx_bytes() / entries, 1),
        "rss_mb": round(rss_bytes() / 2**20, 1),
        "add_us_per_block": round(took / added * 1e6, 3),
    }


def main(args: argparse.Namespace) -> int:
    row = measure(args.pods, args.blocks, args.shared, args.seed)
    print(table([row], COLUMNS))
    print(f"({machine()})")
    write_json(args.out, row)
    return 0
