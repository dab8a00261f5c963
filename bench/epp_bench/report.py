"""Present bench results: a table for the terminal and a PNG of TTFT and throughput per policy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = (
    ("policy", "{:<17}", None),  # fits "vllm-router-tuned"
    ("TTFT p50", "{:>9}", "ttft_p50_s"),
    ("TTFT p90", "{:>9}", "ttft_p90_s"),
    ("TTFT p99", "{:>9}", "ttft_p99_s"),
    ("ITL mean", "{:>9}", "itl_mean_s"),
    ("out tok/s", "{:>10}", "output_tokens_per_s"),
    ("req/s", "{:>7}", "requests_per_s"),
    ("errors", "{:>7}", "errors"),
    ("hit rate", "{:>9}", "hit_rate"),
)


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key.endswith("_per_s"):
        return f"{value:.1f}"
    if key.endswith("_s"):
        return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"
    if key == "hit_rate":
        return f"{value:.1%}"
    if key == "errors":
        return str(int(value))
    return f"{value:.1f}"


def table(doc: dict[str, Any]) -> str:
    header = " ".join(fmt.format(title) for title, fmt, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, figures in doc["policies"].items():
        cells = [COLUMNS[0][1].format(name)]
        cells += [fmt.format(_fmt(key, figures.get(key))) for _, fmt, key in COLUMNS[1:] if key]
        lines.append(" ".join(cells))
    lines.append(f"oracle prefix-cache hit rate (best any router could reach): {doc['oracle_hit_rate']:.1%}")
    base = doc["policies"].get("round-robin", {}).get("ttft_p90_s")
    for name, figures in doc["policies"].items():
        p90 = figures.get("ttft_p90_s")
        if name != "round-robin" and base and p90 and not math.isnan(p90) and p90 > 0:
            lines.append(f"TTFT p90 {name} vs round-robin: {base / p90:.1f}x better")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["policies"])
    figures = [doc["policies"][n] for n in names]
    fig, (ax_ttft, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    xs = range(len(names))
    for i, (key, label) in enumerate((("ttft_p50_s", "p50"), ("ttft_p90_s", "p90"), ("ttft_p99_s", "p99"))):
        ax_ttft.bar([x + (i - 1) * width for x in xs], [f.get(key) or 0 for f in figures], width, label=label)
    ax_ttft.set_title("Time to first token (s, lower is better)")
    ax_ttft.set_xticks(list(xs), names, rotation=20)
    ax_ttft.legend()
    ax_tput.bar(list(xs), [f.get("output_tokens_per_s") or 0 for f in figures], color="tab:green")
    ax_tput.set_title("Output tokens/s (higher is better)")
    ax_tput.set_xticks(list(xs), names, rotation=20)
    fig.suptitle(f"{doc['workload'].get('kind', '')} workload, {doc.get('simulators', '?')} simulators")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
