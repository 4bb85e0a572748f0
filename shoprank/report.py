"""The demo's report: what the run did, in Markdown with PNG plots, under ``var/demo/report/``.

- the publish-to-result latency of the demo's live searches (histogram, p50/p95/p99);
- their ranking quality (MAP@5, NDCG@10, MRR of the clicks that followed, overall and per day);
- from ``make loop-eval``'s ``bench/results/loop.json`` when it exists (said so in the report):
  quality per arm (static version, continuous loop, online query table, offline harness) overall
  and per simulated day, and the trainer's cycles on that timeline (each promotion a hot swap,
  each rejection kept out of serving).

``write_report`` takes the figures as plain data so it can be tested without an engine running.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from core.events import Query, RankedResult
from core.settings import ROOT

NAMES = ("map@5", "ndcg@10", "mrr")
ARM_TITLES = {"static": "static version", "continuous": "continuous loop",
              "query_table": "online query table", "offline": "offline harness",
              "demo": "this demo's searches"}
COLORS = {"static": "tab:blue", "continuous": "tab:green", "query_table": "tab:gray", "offline": "tab:orange",
          "demo": "tab:red"}


@dataclass(frozen=True)
class DemoFigures:
    """What the demo's live window measured."""

    version: str  # the model version that served
    asked: int  # searches published
    latencies_ms: list[float]  # publish-to-result latency of each answered search
    errors: int  # answered with an error
    quality: dict[str, Any]  # evaluation.loop.summary of the clicks: metrics, counts, per_day
    window: tuple[str, str]  # event time of the first and last live search (ISO 8601)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def demo_figures(version: str, queries: Sequence[Query], results: Sequence[RankedResult],
                 clicked: Mapping[str, Sequence[str]]) -> DemoFigures:
    """The figures of searches ranked live and the clicks that followed each (``clicked``: query
    id -> clicked product ids); a click's position is where the served list had the product."""
    from evaluation.loop import ServedClick, summary

    by_id = {r.query_id: r for r in results}
    rows = [ServedClick(q.query_id, q.timestamp.date().isoformat(),
                        {p.product_id: p.position for p in by_id[q.query_id].products}.get(pid)
                        if q.query_id in by_id else None)
            for q in queries for pid in clicked.get(q.query_id, [])]
    times = sorted(q.timestamp for q in queries)
    window = (times[0].isoformat(), times[-1].isoformat()) if times else ("", "")
    return DemoFigures(version=version, asked=len(queries), latencies_ms=[r.latency_ms for r in results],
                       errors=sum(1 for r in results if r.error), quality=summary(rows), window=window)


# --- plots ------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_latency(figures: DemoFigures, path: Path) -> Path:
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    lat = np.asarray(figures.latencies_ms)
    ax.hist(lat, bins=min(40, max(5, len(lat) // 5)), color="tab:blue", alpha=0.8)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = figures.percentile(q)
        ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"p{q} {v:.1f} ms")
    ax.set_xlabel("publish-to-result latency (ms)")
    ax.set_ylabel("searches")
    ax.set_title(f"{figures.answered} live searches ranked by {figures.version}")
    ax.legend()
    return _save(fig, path)


def _arms(loop: Mapping[str, Any] | None, figures: DemoFigures) -> dict[str, dict[str, Any]]:
    arms = dict(loop.get("arms", {})) if loop else {}
    arms["demo"] = figures.quality
    return arms


def plot_quality_per_arm(arms: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(8, 3.8))
    ax = fig.add_subplot()
    names = list(arms)
    width = 0.8 / len(NAMES)
    for i, metric in enumerate(NAMES):
        values = [float(arms[a].get(metric, 0.0)) for a in names]
        bars = ax.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(names)), [ARM_TITLES.get(a, a) for a in names], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("mean over clicks")
    ax.set_title("ranking quality per arm")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_quality_per_day(arms: Mapping[str, Mapping[str, Any]], cycles: Sequence[Mapping[str, Any]],
                         path: Path) -> Path:
    """MAP@5 per simulated day, one line per arm, the trainer's cycles marked on the days they
    ran (a promotion is a swap: the new version serves that day on)."""
    days = sorted({d for a in arms.values() for d in a.get("per_day", {})})
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    x = {d: i for i, d in enumerate(days)}
    for name, arm in arms.items():
        per_day = arm.get("per_day", {})
        pts = [(x[d], per_day[d]["map@5"]) for d in days if d in per_day]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3 if name != "demo" else 7,
                    linestyle="-" if name != "demo" else "none", color=COLORS.get(name),
                    label=ARM_TITLES.get(name, name))
    _mark_cycles(ax, cycles, x)
    ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45, fontsize=8)
    ax.set_ylabel("MAP@5")
    ax.set_title("quality per simulated day (event time)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _mark_cycles(ax: Any, cycles: Sequence[Mapping[str, Any]], x: Mapping[str, int]) -> None:
    said: set[str] = set()
    for c in cycles:
        if c.get("day") not in x:
            continue
        promoted = c.get("outcome") == "promoted"
        label = "swap (promoted)" if promoted else f"cycle {c.get('outcome')}"
        ax.axvline(x[c["day"]] - 0.5, color="tab:green" if promoted else "tab:red", alpha=0.35,
                   linestyle="-" if promoted else "--", label=None if label in said else label)
        said.add(label)


def plot_swaps(loop: Mapping[str, Any], path: Path) -> Path:
    """The trainer's cycles on the simulated timeline: each one's gate difference (candidate minus
    serving, holdout MAP@5) with its 95% interval, promoted ones green (a swap), others red."""
    cycles = [c for c in loop.get("cycles", []) if c.get("day")]
    days = sorted({c["day"] for c in cycles} | set(loop.get("settings", {}).get("days", [])))
    x = {d: i for i, d in enumerate(days)}
    fig = Figure(figsize=(9, 3.8))
    ax = fig.add_subplot()
    for c in cycles:
        gate = c.get("gate") or {}
        diff, ci = gate.get("diff"), gate.get("ci95")
        color = "tab:green" if c.get("outcome") == "promoted" else "tab:red"
        if diff is None:
            ax.scatter([x[c["day"]]], [0.0], marker="x", color=color)
            continue
        err = [[diff - ci[0]], [ci[1] - diff]] if ci else None
        ax.errorbar([x[c["day"]]], [diff], yerr=err, fmt="o", color=color, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45, fontsize=8)
    ax.set_ylabel("gate: candidate - serving MAP@5")
    promoted = sum(1 for c in cycles if c.get("outcome") == "promoted")
    ax.set_title(f"trainer cycles per simulated day: {promoted} swaps (green), "
                 f"{len(cycles) - promoted} not promoted (red)")
    return _save(fig, path)


# --- the report -------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _shown(path: Path) -> str:
    """A path as the report names it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_report(out_dir: Path, figures: DemoFigures, loop_json: Path | None, console_url: str,
                 now: datetime | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir`` (created; earlier plots replaced);
    returns the Markdown file's path. ``loop_json`` absent or missing: the demo's own figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    loop = json.loads(loop_json.read_text()) if loop_json is not None and loop_json.is_file() else None
    arms = _arms(loop, figures)
    cycles = loop.get("cycles", []) if loop else []
    q = figures.quality
    now = now or datetime.now(UTC)
    lines = [
        "# shoprank demo report",
        "",
        f"Written {now:%Y-%m-%d %H:%M} UTC by `make demo`. Model version served: `{figures.version}`. "
        f"Live window (event time): {figures.window[0]} to {figures.window[1]}.",
        "",
        f"Look further in the console: `shoprank console`, then {console_url} (search with explain, "
        "shopper profiles, model lineage, quality and live figures).",
        "",
        "## The live searches",
        "",
        "Each search was published as a query and ranked by the running scorer before its clicks "
        "reached the engine; the clicks followed, and the next search waited until the feature "
        "worker had applied them.",
        "",
        "| searches | answered | errors | latency p50 | p95 | p99 | clicks | MAP@5 | NDCG@10 | MRR |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {figures.asked} | {figures.answered} | {figures.errors} | {figures.percentile(50):.1f} ms "
        f"| {figures.percentile(95):.1f} ms | {figures.percentile(99):.1f} ms | {q.get('clicks', 0)} "
        f"| {_fmt(q.get('map@5', 0.0))} | {_fmt(q.get('ndcg@10', 0.0))} | {_fmt(q.get('mrr', 0.0))} |",
        "",
    ]
    if figures.latencies_ms:
        plot_latency(figures, out_dir / "latency.png")
        lines += ["![latency histogram](latency.png)", ""]
    else:
        lines += ["No search was answered: no latency plot.", ""]
    if q.get("per_day"):
        lines += ["| day | clicks | MAP@5 | NDCG@10 | MRR |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {d} | {v['clicks']} | {_fmt(v['map@5'])} | {_fmt(v['ndcg@10'])} | {_fmt(v['mrr'])} |"
                  for d, v in q["per_day"].items()]
        lines.append("")
    lines += ["## Quality per arm and per day, and the swaps", ""]
    if loop is None:
        where = f"{_shown(loop_json)} is missing" if loop_json is not None else "no results file given"
        lines += [f"`make loop-eval` has not run ({where}): the arms (static version, continuous "
                  "loop, online query table, offline harness) and the trainer's swaps come from it. Below, "
                  "this demo's searches alone; the demo runs no trainer, so it made no swap.", ""]
    else:
        assert loop_json is not None
        lines += [
            f"From `make loop-eval` (`{_shown(loop_json)}`, measured {loop.get('measured_at')} "
            f"on host {loop.get('host')}, "
            f"{loop.get('cpus')} cores): Best Buy's test period, {loop.get('searches')} searches over "
            f"{loop.get('days')} simulated days through the running engine in event time, each ranked "
            "before its clicks existed; not this demo's run. This demo's searches are the red points.",
            "",
            "| arm | MAP@5 | NDCG@10 | MRR | clicks |", "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {ARM_TITLES.get(a, a)} | {_fmt(v.get('map@5'))} | {_fmt(v.get('ndcg@10'))} "
                  f"| {_fmt(v.get('mrr'))} | {v.get('clicks')} |" for a, v in arms.items()]
        cs = loop.get("continuous_vs_static")
        if cs:
            lines += ["", f"Continuous loop vs static version: MAP@5 {cs['diff']:+.4f}, 95% CI {cs['ci95']} "
                          f"(paired bootstrap over {cs['searches']} searches)."]
        lines.append("")
    plot_quality_per_arm(arms, out_dir / "quality_per_arm.png")
    plot_quality_per_day(arms, cycles, out_dir / "quality_per_day.png")
    lines += ["![quality per arm](quality_per_arm.png)", "", "![quality per day](quality_per_day.png)", ""]
    if loop is not None and cycles:
        plot_swaps(loop, out_dir / "swaps.png")
        lines += ["![swaps](swaps.png)", "", "| day | outcome | version | gate diff | 95% CI | cycle s |",
                  "|---|---|---|---:|---|---:|"]
        for c in cycles:
            gate = c.get("gate") or {}
            lines.append(f"| {c.get('day')} | {c.get('outcome')} | `{c.get('version')}` | "
                         f"{_fmt(gate.get('diff'))} | {_fmt(gate.get('ci95'))} | {c.get('cycle_s', '')} |")
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
