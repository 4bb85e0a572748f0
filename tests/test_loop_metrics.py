"""Ranking quality from served positions (evaluation.loop): the figures `make loop-eval` reports."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import metrics
from evaluation.loop import ServedClick, by_group, click_metrics, paired_bootstrap, served_clicks, summary


def test_served_positions_score_as_the_harness_scores_the_same_ranking() -> None:
    rng = np.random.default_rng(3)
    n, width = 200, 40
    scores = rng.random((n, width))
    clicked = rng.integers(0, width, size=n)
    grades = np.zeros((n, width), dtype=np.int64)
    grades[np.arange(n), clicked] = 1
    grades[-5:] = 0  # clicks on products the list does not hold: misses
    offline = metrics.per_query(scores, grades)
    order = np.argsort(-scores, axis=1)
    served = [int(np.flatnonzero(order[i] == clicked[i])[0]) + 1 for i in range(n - 5)] + [None] * 5
    online = click_metrics(served, width)
    for name in ("map@5", "ndcg@10", "mrr"):
        np.testing.assert_allclose(online[name], offline[name], atol=1e-12)
    assert online["map@5"][-5:].sum() == 0.0
    assert click_metrics([1, 2, 6, None])["map@5"].tolist() == [1.0, 0.5, 0.0, 0.0]


def test_summary_per_day_and_rows_per_click() -> None:
    clicked = {"q1": ["a", "b"], "q2": ["a"], "q3": ["c"]}
    positions = {"q1": {"a": 1, "b": 4}, "q2": {"a": 2}}  # q3 unanswered
    days = {"q1": "2011-10-20", "q2": "2011-10-20", "q3": "2011-10-21"}
    clicks = served_clicks(clicked, positions, ["q1", "q2", "q3"], days)
    assert [c.position for c in clicks] == [1, 4, 2, None]
    s = summary(clicks)
    assert s["clicks"] == 4 and s["searches"] == 3
    assert s["map@5"] == pytest.approx((1 + 0.25 + 0.5 + 0) / 4, abs=1e-4)
    per_day = s["per_day"]
    assert per_day["2011-10-20"]["map@5"] == pytest.approx((1 + 0.25 + 0.5) / 3, abs=1e-4)
    assert per_day["2011-10-20"]["clicks"] == 3
    assert per_day["2011-10-21"]["map@5"] == 0.0
    groups = by_group(clicks, ["busy", "busy", "new", "new"])
    assert groups["busy"]["mrr"] == pytest.approx((1 + 0.25) / 2) and groups["busy"]["clicks"] == 2
    assert groups["new"]["map@5"] == pytest.approx(0.25)


def test_paired_bootstrap_over_searches() -> None:
    base = [ServedClick(f"q{i}", "d", 2) for i in range(300)]
    better = [ServedClick(f"q{i}", "d", 1) for i in range(300)]
    same = paired_bootstrap(base, base)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    up = paired_bootstrap(base, better)
    assert up["diff"] == pytest.approx(0.5) and up["ci95"][0] > 0.4
    mixed = [ServedClick(f"q{i}", "d", 1 if i % 2 else 3) for i in range(300)]
    ci = paired_bootstrap(base, mixed, samples=500)["ci95"]
    assert ci[0] < 0.5 - 1 / 3 < ci[1]  # mean of 1 and 1/3, minus 1/2
    with pytest.raises(ValueError, match="same clicks"):
        paired_bootstrap(base, better[:-1])
