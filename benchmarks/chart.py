"""The PNG chart of a run: warm throughput and latency per path, cold-start phases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["gateway", "agent", "rie", "floor_aiohttp", "floor_raw"]
SHORT = {
    "gateway": "(a) gateway",
    "agent": "(b) agent",
    "rie": "(c) emulator",
    "floor_aiohttp": "(d) aiohttp floor",
    "floor_raw": "(d) raw asyncio",
    "gateway_no_spare": "(a) no spare",
    "gateway_no_fast_start": "(a) no fast start",
}
COLORS = {
    "gateway": "#1f77b4",
    "agent": "#6baed6",
    "rie": "#ff7f0e",
    "floor_aiohttp": "#7f7f7f",
    "floor_raw": "#c7c7c7",
}
PHASE_COLORS = {
    "spawn": "#9ecae1",
    "spawn_and_runtime_init": "#9ecae1",
    "runtime_init": "#4292c6",
    "handler_import": "#08519c",
    "first_response": "#fd8d3c",
}


def draw(results: dict[str, Any], path: Path) -> None:
    warm = results.get("warm", [])
    concurrencies = sorted({row["concurrency"] for row in warm})
    names = [n for n in ORDER if any(row["target"] == n for row in warm)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=90)

    ax = axes[0]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rps = {r["concurrency"]: r["rps"] for r in warm if r["target"] == name}
        values = [rps.get(c, 0) for c in concurrencies]
        ax.bar([x + i * width for x in range(len(concurrencies))], values, width, label=SHORT[name], color=COLORS[name])
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(concurrencies))])
    ax.set_xticklabels([f"c={c}" for c in concurrencies])
    ax.set_ylabel("requests/s (2xx)")
    ax.set_yscale("log")
    ax.set_title("Warm throughput (no-op function)")
    ax.legend(fontsize=7)

    ax = axes[1]
    c8 = [r for r in warm if r["concurrency"] == 8]
    labels = [SHORT[n] for n in names if any(r["target"] == n for r in c8)]
    p50 = [next(r["p50_ms"] for r in c8 if r["target"] == n) for n in names if any(r["target"] == n for r in c8)]
    p99 = [next(r["p99_ms"] for r in c8 if r["target"] == n) for n in names if any(r["target"] == n for r in c8)]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color="#3182bd")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color="#e6550d")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("Warm latency at concurrency 8")
    ax.legend(fontsize=7)

    ax = axes[2]
    cold = results.get("cold", {})
    cold_labels = {
        "gateway": "(a) gateway\ndefault",
        "gateway_no_spare": "(a) gateway\nno spare",
        "gateway_no_fast_start": "(a) gateway\n--no-fast-start",
        "agent": "(b) agent",
        "rie": "(c) emulator",
    }
    kinds = [(k, label) for k, label in cold_labels.items() if k in cold]
    for x, (kind, _) in enumerate(kinds):
        bottom = 0.0
        data = cold[kind]
        for phase, color in PHASE_COLORS.items():
            if phase in data:
                value = float(data[phase]["p50"])
                ax.bar(x, value, 0.6, bottom=bottom, color=color, label=phase if x == 0 or kind == "rie" else None)
                bottom += value
        ax.text(x, bottom, f"{data['total']['p50']:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(range(len(kinds))))
    ax.set_xticklabels([label for _, label in kinds], fontsize=7)
    ax.set_ylabel("ms (p50 of each phase)")
    ax.set_title("Cold start, first invocation")
    handles, legend_labels = ax.get_legend_handles_labels()
    unique = dict(zip(legend_labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
