"""Present bench results: a table for the terminal and a PNG of TTFT and throughput per policy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = (
    ("policy", "{:<18}", None),  # fits "shared-cache-floor"
    ("TTFT p50", "{:>9}", "ttft_p50_s"),
    ("TTFT p90", "{:>9}", "ttft_p90_s"),
    ("TTFT p99", "{:>9}", "ttft_p99_s"),
    ("ITL mean", "{:>9}", "itl_mean_s"),
    ("out tok/s", "{:>10}", "output_tokens_per_s"),
    ("req/s", "{:>7}", "requests_per_s"),
    ("errors", "{:>7}", "errors"),
    ("hit rate", "{:>9}", "hit_rate"),
    ("pods/group", "{:>10}", "pods_per_group"),
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
    if key == "pods_per_group":
        return f"{value:.2f}"
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
            ratio = base / p90
            verdict = f"{ratio:.1f}x better" if ratio >= 1 else f"{1 / ratio:.1f}x worse"
            lines.append(f"TTFT p90 {name} vs round-robin: {verdict}")
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


def ladder_tables(doc: dict[str, Any]) -> str:
    """A load ladder: the table of each rung (and seed), then the summary (policy x rate: TTFT p90
    / hit rate, the median over the seeds), and with several seeds each seed's TTFT p90."""
    seeds = int(doc.get("ladder_seeds", 1))

    def title(run: dict[str, Any]) -> str:
        return f"--- {run['rate']:g} req/s" + (f", seed {run['seed']}" if seeds > 1 else "") + " ---"

    parts = [f"{title(run)}\n{table(run)}" for run in doc["runs"]]
    rates = doc["ladder"]
    cell = "{:>17}"
    header = " ".join([COLUMNS[0][1].format("TTFT p90 / hit"), *(cell.format(f"{r:g} req/s") for r in rates)])
    median = f" (median of {seeds} seeds)" if seeds > 1 else ""
    lines = [f"--- load ladder summary{median} ---", header, "-" * len(header)]
    each = [f"--- TTFT p90 of each seed ({seeds}) ---", header, "-" * len(header)]
    oracle: dict[float, float] = {}
    for name, points in doc["summary"].items():
        by_rate = {p["rate"]: p for p in points}
        cells, each_cells = [], []
        for rate in rates:
            p = by_rate.get(rate)
            if p is None:
                cells.append(cell.format("-"))
                each_cells.append(cell.format("-"))
                continue
            oracle.setdefault(rate, p["oracle_hit_rate"])
            p90, hit = _fmt("ttft_p90_s", p["ttft_p90_s"]), _fmt("hit_rate", p["hit_rate"])
            cells.append(cell.format(f"{p90} / {hit}"))
            runs = p.get("ttft_p90_s_each") or [p["ttft_p90_s"]]
            each_cells.append(cell.format(" ".join(f"{v:.2f}" for v in runs)))
        lines.append(COLUMNS[0][1].format(name) + " " + " ".join(cells))
        each.append(COLUMNS[0][1].format(name) + " " + " ".join(each_cells))
    lines.append(
        COLUMNS[0][1].format("oracle hit rate")
        + " "
        + " ".join(cell.format(_fmt("hit_rate", oracle[r]) if r in oracle else "-") for r in rates)
    )
    return "\n\n".join([*parts, "\n".join(lines), *(["\n".join(each)] if seeds > 1 else [])])


def ladder_plot(doc: dict[str, Any], path: Path) -> None:
    """TTFT p90 and hit rate against the offered rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_hit) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in doc["summary"].items():
        rates = [p["rate"] for p in points]
        ax_ttft.plot(rates, [p["ttft_p90_s"] for p in points], marker="o", label=name)
        ax_hit.plot(rates, [p["hit_rate"] for p in points], marker="o", label=name)
    oracle = {p["rate"]: p["oracle_hit_rate"] for points in doc["summary"].values() for p in points}
    ax_hit.plot(doc["ladder"], [oracle.get(r) for r in doc["ladder"]], "k--", label="oracle")
    ax_ttft.set_title("TTFT p90 (s, lower is better)")
    ax_ttft.set_xlabel("offered load (req/s)")
    ax_ttft.set_yscale("log")
    ax_ttft.legend(fontsize="small")
    ax_hit.set_title("Prefix-cache hit rate (higher is better)")
    ax_hit.set_xlabel("offered load (req/s)")
    ax_hit.set_ylim(0, 1)
    ax_hit.legend(fontsize="small")
    fig.suptitle(
        f"Load ladder: {doc['workload'].get('kind', '')} workload, {doc.get('simulators', '?')} simulators"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
