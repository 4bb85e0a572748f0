"""shoprank.report: the demo's Markdown report and its plots, from real events and make loop-eval's
committed results (bench/results/loop.json)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from matplotlib.image import imread

from core.events import Query, RankedProduct, RankedResult
from core.settings import ROOT
from shoprank.report import DemoFigures, demo_figures, write_report

LOOP = ROOT / "bench" / "results" / "loop.json"
T0 = datetime(2011, 10, 30, 12, 0, tzinfo=UTC)
CONSOLE = "http://127.0.0.1:8090"


def live_window() -> DemoFigures:
    """Three searches over two days: the clicked product served at 1, at 2, and not served."""
    queries, results = [], []
    products = [f"sku-{i}" for i in range(10)]
    for i, (text, at) in enumerate([("xbox kinect", T0), ("halo 4", T0 + timedelta(hours=2)),
                                    ("ipad case", T0 + timedelta(days=1))]):
        q = Query(query_id=f"q{i}", user_id=f"u{i}", session_id="s", text=text, timestamp=at)
        queries.append(q)
        ranked = [RankedProduct(product_id=p, position=k + 1, score=1.0 - k / 10)
                  for k, p in enumerate(products)]
        results.append(RankedResult(query_id=q.query_id, user_id=q.user_id, session_id="s",
                                    model_version="v1", products=ranked, latency_ms=10.0 + 5 * i,
                                    timestamp=at))
    clicked = {"q0": ["sku-0"], "q1": ["sku-1"], "q2": ["not-in-the-list"]}
    return demo_figures("v1", queries, results, clicked)


def test_figures_of_the_live_window() -> None:
    f = live_window()
    assert (f.asked, f.answered, f.errors) == (3, 3, 0)
    assert f.quality["map@5"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert f.quality["mrr"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert f.quality["clicks"] == 3 and f.quality["searches"] == 3
    assert set(f.quality["per_day"]) == {"2011-10-30", "2011-10-31"}
    assert f.quality["per_day"]["2011-10-30"]["map@5"] == 0.75
    assert f.window == (T0.isoformat(), (T0 + timedelta(days=1)).isoformat())
    assert f.percentile(50) == 15.0


def _pngs_of(report: Path) -> list[Path]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text())
    paths = [report.parent / n for n in names]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        h, w = imread(p).shape[:2]
        assert h > 200 and w > 400, (p, h, w)
    assert sorted(report.parent.glob("*.png")) == sorted(paths)  # no stale plot left beside them
    return paths


def test_report_with_loop_eval_results(tmp_path: Path) -> None:
    if not LOOP.is_file():
        pytest.fail(f"{LOOP} is committed with the repository; it is missing")
    loop = json.loads(LOOP.read_text())
    (tmp_path / "stale.png").write_bytes(b"old")
    report = write_report(tmp_path, live_window(), LOOP, CONSOLE)
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert {p.name for p in _pngs_of(report)} == {"latency.png", "quality_per_arm.png", "quality_per_day.png",
                                                 "swaps.png"}
    assert "bench/results/loop.json" in text and str(loop["measured_at"]) in text
    assert f"| continuous loop | {loop['arms']['continuous']['map@5']:.4f}" in text
    assert f"| static version | {loop['arms']['static']['map@5']:.4f}" in text
    assert "| this demo's searches | 0.5000" in text
    # One row per trainer cycle, with its outcome.
    for c in loop["cycles"]:
        assert f"| {c['day']} | {c['outcome']} | `{c['version']}`" in text
    assert f"`shoprank console`, then {CONSOLE}" in text
    assert "| 3 | 3 | 0 | 15.0 ms |" in text


def test_report_without_loop_eval_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "results" / "loop.json"
    report = write_report(tmp_path / "report", live_window(), missing, CONSOLE)
    text = report.read_text()
    assert "`make loop-eval` has not run" in text and str(missing) in text
    assert "made no swap" in text
    assert {p.name for p in _pngs_of(report)} == {"latency.png", "quality_per_arm.png", "quality_per_day.png"}


def test_report_of_a_run_that_answered_nothing(tmp_path: Path) -> None:
    f = live_window()
    empty = DemoFigures(version="v1", asked=3, latencies_ms=[], errors=0, quality=f.quality, window=f.window)
    text = write_report(tmp_path, empty, None, CONSOLE).read_text()
    assert "No search was answered" in text
    assert "latency.png" not in text
