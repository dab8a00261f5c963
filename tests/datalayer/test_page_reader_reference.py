"""The page reader against prometheus-client's parser, on random valid pages read in random chunks.

The reader searches for each family only until its lines are over and skips the rest unparsed;
prometheus-client parses every line. On pages the text format allows (each family's lines
together, in any order, with unwanted families, longer names that start like wanted ones,
comments, histograms, several series per family), both must give the same values.
"""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer import model_server_metrics
from epp.datalayer.model_server_metrics import VLLM, PageReader

WAITING, RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
KV, OLD_KV = "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"
LORA, CACHE = "vllm:lora_requests_info", "vllm:cache_config_info"


def _family(rng: random.Random, name: str, kind: str, samples: list[str]) -> str:
    head = f"# HELP {name} Some help.\n# TYPE {name} {kind}\n" if rng.random() < 0.8 else ""
    if rng.random() < 0.2 and len(samples) > 1:
        samples.insert(1, "# just a comment")
    return head + "".join(line + "\n" for line in samples)


def _gauge(rng: random.Random, name: str, ranks: int, low: float, high: float) -> str:
    samples = [f'{name}{{engine="{r}",model_name="m"}} {rng.uniform(low, high):.4f}' for r in range(ranks)]
    return _family(rng, name, "gauge", samples)


def random_page(rng: random.Random) -> str:
    ranks = rng.randint(1, 3)
    families = [
        _gauge(rng, WAITING, ranks, 0, 20),
        _gauge(rng, RUNNING, ranks, 0, 60),
        _gauge(rng, WAITING + "_by_reason", ranks, 0, 9),  # a longer name, not ours
        _family(rng, RUNNING + "_total", "counter", [f"{RUNNING}_total {rng.randint(0, 99)}"]),
        _family(rng, "process_open_fds", "gauge", [f"process_open_fds {rng.randint(1, 999)}"]),
    ]
    if rng.random() < 0.8:
        families.append(_gauge(rng, KV, ranks, 0, 1))
    if rng.random() < 0.5:
        families.append(_gauge(rng, OLD_KV, ranks, 0, 1))
    if rng.random() < 0.7:
        adapters = ",".join(rng.sample(["a", "b", "c", "d"], rng.randint(0, 3)))
        stamps = sorted(rng.uniform(1e9, 2e9) for _ in range(rng.randint(1, 3)))
        max_lora = rng.randint(1, 8)
        samples = [
            f'{LORA}{{max_lora="{max_lora}",running_lora_adapters="{adapters}{i}",'
            f'waiting_lora_adapters=""}} {t:.1f}'
            for i, t in enumerate(rng.sample(stamps, len(stamps)))
        ]
        families.append(_family(rng, LORA, "gauge", samples))
    if rng.random() < 0.8:
        line = f'{CACHE}{{block_size="{rng.choice([16, 32])}",num_gpu_blocks="{rng.randint(1, 99999)}"}} 1.0'
        families.append(_family(rng, CACHE, "gauge", [line]))
    for h in range(rng.randint(0, 4)):
        name = f"vllm:latency_{h}_seconds"
        buckets = [f'{name}_bucket{{le="{b}",model_name="m"}} {b * 3}' for b in (0.1, 1.0, 10.0)]
        families.append(_family(rng, name, "histogram", [*buckets, f"{name}_count 9", f"{name}_sum 4.5"]))
    rng.shuffle(families)
    return "".join(families)


Snapshot = tuple[int, int, float, tuple[str, ...], int, int | None, int | None]


def expected(page: str) -> Snapshot:
    """Waiting and running summed over series, KV use (the newer gauge, else the older) their mean
    (a pod's data-parallel engines each report theirs); the LoRA
    info series with the newest value's adapters and max; the cache info's block size and blocks."""
    sums: dict[str, float] = {}
    series: dict[str, int] = {}
    lora: tuple[float, dict[str, str]] | None = None
    cache: dict[str, str] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in (WAITING, RUNNING, KV, OLD_KV):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                series[sample.name] = series.get(sample.name, 0) + 1
            elif sample.name == LORA and (lora is None or sample.value > lora[0]):
                lora = (sample.value, sample.labels)
            elif sample.name == CACHE:
                cache = sample.labels
    kv_name = KV if KV in sums else OLD_KV
    kv = sums[kv_name] / series[kv_name] if kv_name in sums else 0.0
    running_loras = sorted(a for a in (lora[1]["running_lora_adapters"].split(",") if lora else []) if a)
    return (
        int(sums.get(WAITING, 0)),
        int(sums.get(RUNNING, 0)),
        round(min(max(kv, 0.0), 1.0), 9),
        tuple(running_loras),
        int(lora[1]["max_lora"]) if lora else 0,
        int(cache["block_size"]) if cache else None,
        int(cache["num_gpu_blocks"]) if cache else None,
    )


def _read(reader: PageReader, data: bytes, rng: random.Random) -> Snapshot:
    """What `reader` makes of the page fed in pieces of random sizes, as socket reads come."""
    at = 0
    while at < len(data):
        step = rng.choice([1, 7, 64, 1000, 1 << 20])
        reader.feed(data[at : at + step])
        at += step
    m = reader.finish(now=1.0)
    return (
        m.waiting_queue_size,
        m.running_requests,
        round(m.kv_cache_usage, 9),
        tuple(sorted(m.running_loras)),
        m.max_loras,
        m.block_size,
        m.num_gpu_blocks,
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_reader_agrees_with_prometheus_client_on_valid_pages(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        page = random_page(rng)
        assert _read(PageReader(VLLM), page.encode(), rng) == expected(page), page


@pytest.mark.parametrize("slack", [0, 16, 200, model_server_metrics.HINT_SLACK_BYTES])
@pytest.mark.parametrize("seed", range(12))
def test_where_the_last_page_had_a_family_never_changes_what_is_read(
    seed: int, slack: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One endpoint's pages in a row share their hints (as the scraper's polls do): the next page
    is searched first where the last one had each family. Here every page has its families in
    another order and size, so the hints point at other families, into the middle of a family's
    lines (comments between them), or past the page's end; what is read must not change."""
    monkeypatch.setattr(model_server_metrics, "HINT_SLACK_BYTES", slack)
    rng = random.Random(1000 + seed)
    hints: dict[bytes, int] = {}
    for _ in range(30):
        page = random_page(rng)
        assert _read(PageReader(VLLM, hints=hints), page.encode(), rng) == expected(page), page
        assert hints, "the reader records where it found the families"


def test_a_family_that_moved_up_is_read_from_its_first_line() -> None:
    """The hint points at the family's second line (the page before it shrank): its first line,
    before the hint, must still be counted."""
    filler = "".join(f"filler_{i} {i}\n" for i in range(400))

    def page(pad: str) -> bytes:
        return (
            pad + f'{WAITING}{{engine="0"}} 1\n# a comment\n{WAITING}{{engine="1"}} 2\n{RUNNING} 3\n'
        ).encode()

    hints: dict[bytes, int] = {}
    first = PageReader(VLLM, hints=hints)
    first.feed(page(filler))
    assert first.finish(now=1.0).waiting_queue_size == 3
    second = PageReader(VLLM, hints=hints)
    second.feed(page(""))  # 5 kB shorter: the old offset is now past the page's end
    assert second.finish(now=1.0).waiting_queue_size == 3
    # And the other way: the family sits exactly where the last page's second line was.
    line = f'{WAITING}{{engine="0"}} 1\n# a comment\n'.encode()
    hints[WAITING.encode()] = len(line)
    third = PageReader(VLLM, hints=hints)
    third.feed(page(""))
    assert third.finish(now=1.0).waiting_queue_size == 3
