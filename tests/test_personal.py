"""evaluation.personal and features.session on the real Best Buy data (a small slice of it)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from core.settings import Settings
from evaluation import personal
from evaluation.loop import click_metrics
from evaluation.ranker import SearchRow
from evaluation.splits import bestbuy_split
from features import session

T0 = datetime(2011, 10, 1, tzinfo=UTC)


def _row(qid: str, user: str, minutes: float, text: str, sku: str | None = "1") -> SearchRow:
    t = T0 + timedelta(minutes=minutes)
    return SearchRow(query_id=qid, query=text, user_id=user, query_time=t,
                     click_time=t + timedelta(seconds=30), product_id=sku, grade=1)


def test_sessions_split_by_inactivity() -> None:
    rows = [_row("a", "u", 0, "mw3"), _row("b", "u", 10, "modern warfare 3 hardened"),
            _row("c", "u", 100, "kinect"), _row("d", "v", 5, "halo"), _row("e", "anonymous", 1, "x"),
            _row("f", "anonymous", 2, "y")]
    ctx = personal.Context.of(rows, gap_s=1800)
    assert ctx.sessions["a"][1] == 0 and ctx.sessions["b"] == (ctx.sessions["a"][0], 1)
    assert ctx.sessions["c"][1] == 0 and ctx.sessions["c"][0] != ctx.sessions["a"][0]
    assert not ctx.in_session(rows[3]) and not ctx.in_session(rows[5])  # anonymous: no sessions
    texts, clicked = ctx.earlier(rows[1])
    assert texts == ["mw3"] and clicked == ["1"]
    assert ctx.returning(rows[2]) and not ctx.returning(rows[0]) and not ctx.returning(rows[5])
    # A click made after the search's time is not context yet.
    late = dataclasses.replace(rows[0], click_time=T0 + timedelta(minutes=20))
    ctx2 = personal.Context.of([late, rows[1]], gap_s=1800)
    assert ctx2.earlier(rows[1]) == (["mw3"], [])
    with pytest.raises(ValueError):
        session.sessions([], 0)


def test_click_similarity() -> None:
    cand = np.eye(3, dtype=np.float32)
    assert session.click_similarity(cand, cand[:0]).tolist() == [0, 0, 0]
    assert session.click_similarity(cand, cand[[1]]).tolist() == [0, 1, 0]


def test_walk_on_real_data_tiny_model(tmp_path) -> None:
    """A tiny model trained on a slice of the real log: the walk's positions reproduce the harness's
    own MAP@5, the blend with zero weights changes nothing, the report compares on the same clicks."""
    base = Settings()
    settings = base.model_copy(update={"model": base.model.model_copy(update={"epochs": 1, "refit": False})})
    full = bestbuy_split(settings.data_dir)
    split = dataclasses.replace(full, train=full.train[-3000:], late=[], test=full.test[:150])
    everything = sorted([*split.train, *split.test], key=lambda r: r.query_time)
    ctx = personal.Context.of(everything, settings.features.session_gap_s)
    w = personal.walk(settings, split, ctx, personalized=True, registry=tmp_path / "reg", tiny=True)
    assert w.scores.shape == (150, len(split.catalog))
    clicks = personal.served(w.scores, split)
    mine = float(click_metrics([c.position for c in clicks])["map@5"].mean())
    assert mine == pytest.approx(w.overall["map@5"], abs=1e-9)
    assert len(w.session_rows) == sum(ctx.in_session(r) for r in split.test)
    assert w.session_cols.shape[1:] == (len(split.catalog), 2)
    same = personal.served(personal.blended(w, (0.0, 0.0)), split)
    assert [c.position for c in same] == [c.position for c in clicks]
    keep = personal.slices(split, ctx)
    out = personal.compare(clicks, same, keep["all"])
    assert out["clicks"] == 150 and out["map@5"]["delta"] == 0.0
    path = tmp_path / "w.npz"
    w.save(path)
    back = personal.Walk.load(path)
    assert np.array_equal(back.scores, w.scores) and back.version == w.version
    # A cached walk stands for its own version only (after a retrain it is walked again).
    assert personal.cached_walk(path, w.version) is not None and personal.cached_walk(path, None) is not None
    assert personal.cached_walk(path, "another-version") is None
    assert personal.cached_walk(tmp_path / "none.npz", w.version) is None
    assert (tmp_path / "reg" / "SERVING").exists()
    # The published version walked again, its store rebuilt from the training rows (no training):
    # the same scores as the walk of the model as it was trained.
    again = personal.walk_version(settings, split, ctx, tmp_path / "reg", w.version)
    assert np.allclose(again.scores, w.scores, atol=1e-4)
    assert np.allclose(again.session_cols, w.session_cols, atol=1e-5)
