"""PNG plots drawn on the server with matplotlib (Agg): quality over time and latency from
``make loop-eval``'s bench/results/loop.json, and the live window's throughput and p99."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: PNG bytes only
import matplotlib.pyplot as plt

from console.errors import ConsoleError
from console.live import Live

ARMS = {"continuous": "continuous loop", "static": "static version", "offline": "offline harness",
        "query_table": "online query table"}


def load_loop(path: Path) -> dict[str, Any]:
    """make loop-eval's results, or a ConsoleError saying how to get them."""
    if not path.is_file():
        raise ConsoleError(f"No loop results at {path}: run `make loop-eval` (quick: "
                           "make loop-eval BENCH_ARGS=\"--days 2 --label-days 7\").", 404)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConsoleError(f"{path} is not readable JSON ({exc}): run `make loop-eval` again.", 500) from None


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def quality_png(loop: dict[str, Any], metric: str = "map@5") -> bytes:
    """Each arm's metric per simulated day, with the continuous trainer's promotions marked."""
    fig, ax = plt.subplots(figsize=(9, 4))
    arms = loop.get("arms", {})
    for arm, label in ARMS.items():
        days = arms.get(arm, {}).get("per_day", {})
        if days:
            xs = [datetime.fromisoformat(d) for d in days]
            ax.plot(xs, [v.get(metric) for v in days.values()], marker="o", ms=3,
                    label=f"{label} ({arms[arm].get(metric, float('nan')):.4f} overall)")
    promoted = [datetime.fromisoformat(c["day"]) for c in loop.get("cycles", [])
                if c.get("outcome") == "promoted" and c.get("day")]
    for i, day in enumerate(promoted):
        ax.axvline(day, color="grey", lw=0.6, ls=":", label="new version promoted" if i == 0 else None)
    ax.set_ylabel(metric.upper())
    ax.set_title(f"Quality per day ({metric.upper()}), {loop.get('searches', '?')} searches in event time")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def latency_png(loop: dict[str, Any]) -> bytes:
    """Publish-to-result latency (p50, p99) of the arms the running engine served."""
    arms = [(ARMS[a], v) for a, v in loop.get("arms", {}).items() if "latency_ms_p99" in v and a in ARMS]
    if not arms:
        raise ConsoleError("loop.json has no latency figures: run `make loop-eval` again.", 404)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    xs = range(len(arms))
    for k, (key, label) in enumerate((("latency_ms_p50", "p50"), ("latency_ms_p99", "p99"))):
        vals = [v.get(key, 0.0) for _, v in arms]
        bars = ax.bar([x + (k - 0.5) * width for x in xs], vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), [name for name, _ in arms])
    ax.set_ylabel("ms, query published to result")
    ax.set_title("Latency through the running engine (make loop-eval)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def live_png(live: Live) -> bytes:
    """Throughput and p99 per scrape interval over the samples the console keeps."""
    fig, ax = plt.subplots(figsize=(9, 3))
    if live.history:
        xs = [datetime.fromtimestamp(t, UTC) for t, _, _ in live.history]
        ax.plot(xs, [q for _, q, _ in live.history], color="tab:blue", marker=".", label="queries/s")
        ax.set_ylabel("queries/s", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [p if p is not None else float("nan") for _, _, p in live.history], color="tab:red",
                 marker="o", label="p99 ms")  # markers: an interval with queries between idle ones
        ax2.set_ylabel("p99 ms", color="tab:red")
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no samples yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Scorer, per scrape interval (UTC)")
    ax.grid(alpha=0.3)
    return _png(fig)
