"""`python -m epp_bench.perf.summary DIR`: the Markdown tables of the README's Performance
section and docs/performance.md, from the JSON the four commands wrote into DIR
(`extproc.json`, `pick.json`, `scrape.json`, `memory.json`; a missing one is skipped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def extproc(doc: dict[str, Any]) -> str:
    rows = [
        [
            r["server"],
            str(r["endpoints"]),
            f"{r['body_kb']} kB",
            f"{r['requests_per_s']:,.0f}",
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
            f"{r['cpu_us_per_request']:,.0f}",
            (
                f"{r['loop_cpu_us_per_request']:,.0f} / {r['other_cpu_us_per_request']:,.0f}"
                if "loop_cpu_us_per_request" in r
                else "-"
            ),
            f"{r['rps_ratio']:.0%}" if "rps_ratio" in r else "-",
            f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else "-",
        ]
        for r in doc["runs"]
    ]
    header = [
        "server",
        "endpoints",
        "body",
        "req/s",
        "p50 / p99 ms",
        "CPU us/req",
        "loop / other threads us",
        "req/s vs floor",
        "CPU vs floor",
    ]
    return _rows(header, rows)


def pick(rows: list[dict[str, Any]]) -> str:
    return _rows(
        ["endpoints", "prompt chars", "p50 ms", "p99 ms"],
        [
            [f"{r['endpoints']:,}", f"{r['prompt_chars']:,}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}"]
            for r in rows
        ],
    )


def scrape(rows: list[dict[str, Any]]) -> str:
    return _rows(
        ["client", "pods", "interval", "page", "scrapes/s (at most)", "CPU", "CPU per scrape"],
        [
            [
                _scrape_client(row),
                f"{row['pods']} {row['pods_state']}",
                f"{row['interval_ms']:.0f} ms",
                f"{row['page_bytes']:,} B",
                f"{row['scrapes_per_s']:,.0f} ({row['expected_scrapes_per_s']:,.0f})",
                f"{row['cpu_percent']:.1f} % of a core",
                f"{row['cpu_us_per_scrape']:.0f} us",
            ]
            for row in rows
        ],
    )


def _scrape_client(row: dict[str, Any]) -> str:
    whole = row.get("pages", "whole") == "whole"
    if row.get("client") == "floor":
        return "floor (no parsing), " + ("whole pages" if whole else "families read")
    client = "epp, whole pages (as Go)" if whole else "epp"
    return (
        client if row["idle_interval"] == "every interval" else f"{client}, idle pods {row['idle_interval']}"
    )


def memory(row: dict[str, Any]) -> str:
    return _rows(
        ["pods x blocks", "entries", "bytes/entry (RSS)", "bytes/entry (estimate)", "RSS"],
        [
            [
                f"{row['pods']} x {row['blocks_per_pod']:,}",
                f"{row['entries']:,}",
                f"{row['bytes_per_entry']:.0f}",
                f"{row['estimate_bytes_per_entry']:.0f}",
                f"{row['rss_mb']:,.0f} MB",
            ]
        ],
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        raise SystemExit("usage: python -m epp_bench.perf.summary DIR (holding the commands' JSON)")
    folder = Path(argv[0])
    for name, render in (("extproc", extproc), ("pick", pick), ("scrape", scrape), ("memory", memory)):
        path = folder / f"{name}.json"
        if path.exists():
            print(f"`python -m epp_bench {name}`:\n\n{render(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
