"""Runs a :class:`~evaluation.ranker.Ranker` over a split and measures it, point in time.

Best Buy (:func:`evaluate_bestbuy`): fit on the training clicks, then walk the test rows in query
time order. Before each batch is scored, the ranker observes every click whose click time is no
later than the batch's first query time (late training clicks and already scored test clicks),
and nothing else: a method never sees a click before scoring its query, nor a click that had
not yet happened. Online rankers are scored one row at a time by default, static ones in large
batches (the order of observations is the same; only the batching differs).

CrowdFlower (:func:`evaluate_crowdflower`): a fresh ranker per fold, fit on nine folds, scored on
the tenth; the result is the mean over folds and their sample standard deviation.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import structlog

from evaluation import metrics
from evaluation.ranker import Ranker, SearchRow
from evaluation.splits import CROWDFLOWER_RELEVANT_GRADE, BestBuySplit, CrowdFlowerFold

log = structlog.get_logger(__name__)

STATIC_BATCH = 1024


@dataclass(frozen=True)
class Result:
    """One method measured on one dataset. ``spread``: std over folds (empty for a single split)."""

    method: str
    dataset: str
    metrics: dict[str, float]
    n_queries: int
    protocol: str
    seconds: float
    spread: dict[str, float] = field(default_factory=dict)


# --- Best Buy ---------------------------------------------------------------------------------


def evaluate_bestbuy(
    ranker: Ranker, split: BestBuySplit, *, batch_size: int | None = None, seed: int = 0,
    on_batch: Callable[[int, Sequence[SearchRow], np.ndarray], None] | None = None,
) -> Result:
    """Fit ``ranker`` on the split's training clicks and score every test click (misses included).

    ``on_batch(first_row, rows, scores)`` sees each batch's scores right after they were computed
    (before the batch's clicks are observed): per-row analyses (evaluation.personal) read them."""
    started = time.monotonic()
    candidates = list(split.catalog.values())
    column = {c.product_id: i for i, c in enumerate(candidates)}
    ranker.fit(split.train, split.catalog)
    pending = _Pending(split.late)
    values: list[dict[str, np.ndarray]] = []
    for first, batch in _batches(split.test, batch_size or (1 if ranker.online else STATIC_BATCH)):
        pending.release(ranker, until=_time(batch[0].query_time))
        scores = ranker.score([r.as_query() for r in batch], candidates)
        scores = _checked(scores, len(batch), len(candidates))
        if on_batch is not None:
            on_batch(first, batch, scores)
        values.append(metrics.per_query(scores, _one_hot(batch, column), seed=seed, first_row=first))
        pending.extend(batch)
    result = Result(
        method=ranker.name, dataset="bestbuy", metrics=_mean(values), n_queries=len(split.test),
        protocol=f"time split: last 20% of clicks by query time (after {split.cutoff:%Y-%m-%d %H:%M}), "
                 f"{len(candidates)} candidates, online={ranker.online}",
        seconds=time.monotonic() - started,
    )
    log.info("evaluated", method=result.method, dataset=result.dataset, seconds=round(result.seconds, 1),
             **{k: round(v, 4) for k, v in result.metrics.items()})
    return result


class _Pending:
    """Clicks not yet observed, released to the ranker in click time order."""

    def __init__(self, rows: Sequence[SearchRow]) -> None:
        self._heap: list[tuple[datetime, int, SearchRow]] = []
        self._seq = 0
        self.extend(rows)

    def extend(self, rows: Sequence[SearchRow]) -> None:
        for row in rows:
            heapq.heappush(self._heap, (_time(row.click_time), self._seq, row))
            self._seq += 1

    def release(self, ranker: Ranker, until: datetime) -> None:
        while self._heap and self._heap[0][0] <= until:
            ranker.observe(heapq.heappop(self._heap)[2])


def _time(ts: datetime | None) -> datetime:
    if ts is None:
        raise ValueError("a Best Buy row without a time")
    return ts


def _batches(rows: Sequence[SearchRow], size: int) -> Iterator[tuple[int, Sequence[SearchRow]]]:
    for start in range(0, len(rows), size):
        yield start, rows[start:start + size]


def _one_hot(batch: Sequence[SearchRow], column: dict[str, int]) -> np.ndarray:
    grades = np.zeros((len(batch), len(column)), dtype=np.int64)
    for i, row in enumerate(batch):
        if (col := column.get(row.product_id or "")) is not None:
            grades[i, col] = row.grade
    return grades


def _checked(scores: np.ndarray, n_rows: int, n_candidates: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_rows, n_candidates):
        raise ValueError(f"ranker returned scores of shape {scores.shape}, expected {(n_rows, n_candidates)}")
    return scores


def _mean(values: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return {name: float(np.concatenate([v[name] for v in values]).mean()) for name in values[0]}


# --- CrowdFlower ------------------------------------------------------------------------------


def evaluate_crowdflower(
    make_ranker: Callable[[], Ranker], folds: Sequence[CrowdFlowerFold], *, seed: int = 0
) -> Result:
    """Cross-validate: a fresh ranker per fold; mean and sample std of the per-fold means."""
    started = time.monotonic()
    per_fold, n_queries, name = [], 0, ""
    for fold in folds:
        ranker = make_ranker()
        name = ranker.name
        ranker.fit(fold.train, fold.train_catalog)
        keep = metrics.has_relevant(fold.grades, fold.mask, CROWDFLOWER_RELEVANT_GRADE)
        queries = [q.as_query() for q, k in zip(fold.queries, keep, strict=True) if k]
        scores = _checked(ranker.score(queries, fold.candidates), len(queries), len(fold.candidates))
        values = metrics.per_query(scores, fold.grades[keep], fold.mask[keep],
                                   relevant_grade=CROWDFLOWER_RELEVANT_GRADE, seed=seed)
        per_fold.append({k: float(v.mean()) for k, v in values.items()})
        n_queries += len(queries)
    table = {k: np.array([f[k] for f in per_fold]) for k in per_fold[0]}
    result = Result(
        method=name, dataset="crowdflower", n_queries=n_queries,
        metrics={k: float(v.mean()) for k, v in table.items()},
        spread={k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in table.items()},
        protocol=f"{len(folds)}-fold cross-validation (published folds); per fold, rank each query's "
                 "judged products; relevant = median_relevance >= 3; NDCG gain 2^(label-1)-1",
        seconds=time.monotonic() - started,
    )
    log.info("evaluated", method=result.method, dataset=result.dataset, seconds=round(result.seconds, 1),
             **{k: round(v, 4) for k, v in result.metrics.items()})
    return result
