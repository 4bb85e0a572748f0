"""Ranking quality from what was *served*: the positions a served list gave the clicked products.

The offline harness (:mod:`evaluation.harness`) scores a matrix per test click; a replay through
the running engine has, instead, the ranked results on the results topic. Both are measured the
same way here: one row per click (a search with two clicks is two rows, as in the harness), the
clicked product relevant, everything else not; a click on a product the served list does not
hold (e.g. one missing from the catalog) is a miss, 0 on every metric. The values come from
:mod:`evaluation.metrics`' own functions applied to each row's relevance in served order, so a
served list and the harness's score matrix give the same figure for the same ranking.

Also: figures per simulated day, and a paired bootstrap over searches (two arms that ranked the
same searches: resampling whole searches keeps a search's clicks together).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evaluation import metrics

NAMES = (f"map@{metrics.MAP_K}", f"ndcg@{metrics.NDCG_K}", "mrr")


@dataclass(frozen=True)
class ServedClick:
    """One test click: its search, the simulated day it fell on, and the served 1-based
    position of the clicked product (None: not in the served list, or the search unanswered)."""

    query_id: str
    day: str
    position: int | None


def click_metrics(positions: Sequence[int | None], width: int | None = None) -> dict[str, np.ndarray]:
    """MAP@5, NDCG@10 and MRR per click row, from the clicked product's served position."""
    known = [p for p in positions if p is not None]
    if any(p < 1 for p in known):
        raise ValueError("served positions are 1-based")
    width = max([width or 0, metrics.NDCG_K, *known])
    relevant = np.zeros((len(positions), width), dtype=bool)
    for i, p in enumerate(positions):
        if p is not None:
            relevant[i, p - 1] = True
    n_relevant = relevant.sum(axis=1)
    gains = relevant.astype(np.float64)  # grade 1: gain 2^1 - 1
    ideal = np.sort(gains, axis=1)[:, ::-1]
    return {
        NAMES[0]: metrics.average_precision_at_k(relevant, n_relevant, metrics.MAP_K),
        NAMES[1]: metrics.ndcg_at_k(gains, ideal, metrics.NDCG_K),
        NAMES[2]: metrics.reciprocal_rank(relevant),
    }


def summary(clicks: Sequence[ServedClick]) -> dict[str, object]:
    """Overall and per-day means of each metric, with the click and search counts."""
    values = click_metrics([c.position for c in clicks])
    days: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clicks):
        days[c.day].append(i)

    def block(rows: Sequence[int] | slice) -> dict[str, float | int]:
        return {name: round(float(values[name][rows].mean()), 4) if len(values[name][rows]) else 0.0
                for name in NAMES}

    return {
        **block(slice(None)),
        "clicks": len(clicks),
        "searches": len({c.query_id for c in clicks}),
        "per_day": {day: {**block(rows), "clicks": len(rows)} for day, rows in sorted(days.items())},
    }


def by_group(clicks: Sequence[ServedClick], groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Each metric's mean over the clicks of each group (``groups[i]`` is click i's)."""
    if len(groups) != len(clicks):
        raise ValueError("one group per click")
    values = click_metrics([c.position for c in clicks])
    rows: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows[g].append(i)
    return {g: {**{name: round(float(values[name][idx].mean()), 4) for name in NAMES}, "clicks": len(idx)}
            for g, idx in rows.items()}


def per_search(clicks: Sequence[ServedClick], values: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Searches in first-seen order, the sum of ``values`` over each search's clicks, and its click count."""
    index: dict[str, int] = {}
    for c in clicks:
        index.setdefault(c.query_id, len(index))
    sums, counts = np.zeros(len(index)), np.zeros(len(index))
    rows = np.array([index[c.query_id] for c in clicks], dtype=np.int64)
    np.add.at(sums, rows, values)
    np.add.at(counts, rows, 1.0)
    return list(index), sums, counts


def paired_bootstrap(a: Sequence[ServedClick], b: Sequence[ServedClick], metric: str = NAMES[0],
                     samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``b``'s figure minus ``a``'s on the same clicks, with a 95% CI from resampling searches.

    The two arms must hold the same clicks in the same order (the same test rows, ranked by two
    versions)."""
    if [(c.query_id, c.day) for c in a] != [(c.query_id, c.day) for c in b]:
        raise ValueError("the two arms do not hold the same clicks")
    if not a:
        raise ValueError("no clicks to compare")
    va, vb = click_metrics([c.position for c in a])[metric], click_metrics([c.position for c in b])[metric]
    _, sa, n = per_search(a, va)
    _, sb, _ = per_search(b, vb)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(n), size=(samples, len(n)))
    diffs = (sb[picks].sum(1) - sa[picks].sum(1)) / n[picks].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": round(float(vb.mean() - va.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)], "samples": samples, "searches": len(n)}


def served_clicks(clicked: Mapping[str, Sequence[str]], positions: Mapping[str, Mapping[str, int]],
                  order: Sequence[str], day_of: Mapping[str, str]) -> list[ServedClick]:
    """The click rows of the searches in ``order``: ``clicked`` their clicked products (one row
    each, repeats kept), ``positions`` each answered search's product -> served position."""
    out = []
    for qid in order:
        served = positions.get(qid, {})
        out.extend(ServedClick(qid, day_of[qid], served.get(pid)) for pid in clicked.get(qid, ()))
    return out
