"""Ranking metrics over score matrices, vectorised with numpy.

Inputs are ``(n_queries, n_candidates)`` matrices: ``scores`` (higher is better), ``grades``
(integer relevance, 0 = not relevant) and optionally ``mask`` (which candidates a query may rank;
the rest are ignored). Conventions, fixed here for every method:

- Ties are broken by a fixed pseudo-random order (``seed``), never by candidate position, so a
  method that cannot tell candidates apart earns what random would, not what the list order gives.
- A candidate is *relevant* when its grade >= ``relevant_grade`` (MAP, MRR, recall).
- NDCG uses the exponential gain ``2**grade - 1`` and ``log2(rank + 1)`` discount; the ideal
  ordering is over the query's allowed candidates.
- ``map@k`` divides by ``min(k, number of relevant)`` (the Kaggle Best Buy MAP@5: with one
  relevant item, AP@5 = 1/rank when rank <= 5). ``mrr`` looks at the whole list.
- A query with no relevant candidate scores 0 on every metric (so a click on a product missing
  from the catalog counts as a miss); callers that must exclude such queries use
  :func:`has_relevant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAP_K = 5
NDCG_K = 10
RECALL_KS = (10, 50)


@dataclass(frozen=True)
class Cutoffs:
    map_k: int = MAP_K
    ndcg_k: int = NDCG_K
    recall_ks: tuple[int, ...] = RECALL_KS


def rank_order(
    scores: np.ndarray, mask: np.ndarray | None = None, seed: int = 0, first_row: int = 0
) -> np.ndarray:
    """Candidate indices per row, best first; masked-out candidates last; ties in random order.

    Row ``i``'s tie order depends only on ``(seed, first_row + i)``, so a query gets the same
    tie-break whether it is scored alone or in a batch starting at row ``first_row``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_queries, n_candidates), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    n_rows, n_candidates = scores.shape
    tiebreak = np.stack([np.random.default_rng((seed, first_row + i)).random(n_candidates)
                         for i in range(n_rows)]) if n_rows else np.empty(scores.shape)
    return np.lexsort((tiebreak, -scores), axis=-1)


def average_precision_at_k(relevant_sorted: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k per row from binary relevance in ranked order; 0 where a row has no relevant item."""
    top = relevant_sorted[:, :k].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    denominator = np.minimum(n_relevant, k)
    return np.divide((precision * top).sum(axis=1), denominator,
                     out=np.zeros(len(top)), where=denominator > 0)


def ndcg_at_k(gains_sorted: np.ndarray, ideal_gains_sorted: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per row from gains in ranked order and in ideal order; 0 where the ideal DCG is 0."""
    dcg, ideal = _dcg(gains_sorted, k), _dcg(ideal_gains_sorted, k)
    return np.divide(dcg, ideal, out=np.zeros(len(dcg)), where=ideal > 0)


def _dcg(gains: np.ndarray, k: int) -> np.ndarray:
    top = gains[:, :k].astype(np.float64)
    return (top / np.log2(np.arange(2, top.shape[1] + 2))).sum(axis=1)


def reciprocal_rank(relevant_sorted: np.ndarray) -> np.ndarray:
    """1 / rank of the first relevant item per row (whole list); 0 where there is none."""
    any_relevant = relevant_sorted.any(axis=1)
    first = np.argmax(relevant_sorted, axis=1)
    return np.where(any_relevant, 1.0 / (first + 1), 0.0)


def recall_at_k(relevant_sorted: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Share of a row's relevant items found in its top k; 0 where a row has none."""
    found = relevant_sorted[:, :k].sum(axis=1).astype(np.float64)
    return np.divide(found, n_relevant, out=np.zeros(len(found)), where=n_relevant > 0)


def has_relevant(grades: np.ndarray, mask: np.ndarray | None = None, relevant_grade: int = 1) -> np.ndarray:
    """Which rows have at least one allowed relevant candidate."""
    relevant = np.asarray(grades) >= relevant_grade
    return (relevant & mask if mask is not None else relevant).any(axis=1)


def per_query(
    scores: np.ndarray,
    grades: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    relevant_grade: int = 1,
    cutoffs: Cutoffs = Cutoffs(),
    seed: int = 0,
    first_row: int = 0,
) -> dict[str, np.ndarray]:
    """Every metric of :class:`Cutoffs`, one value per query row (see :func:`rank_order` for ties)."""
    grades = np.asarray(grades)
    if grades.shape != np.shape(scores):
        raise ValueError(f"grades shape {grades.shape} != scores shape {np.shape(scores)}")
    if mask is not None:
        grades = np.where(mask, grades, 0)
    order = rank_order(scores, mask, seed, first_row)
    grades_sorted = np.take_along_axis(grades, order, axis=1)
    relevant_sorted = grades_sorted >= relevant_grade
    n_relevant = (grades >= relevant_grade).sum(axis=1)
    gains_sorted = np.exp2(grades_sorted) - 1
    ideal = np.exp2(-np.sort(-grades, axis=1)) - 1
    out = {
        f"map@{cutoffs.map_k}": average_precision_at_k(relevant_sorted, n_relevant, cutoffs.map_k),
        f"ndcg@{cutoffs.ndcg_k}": ndcg_at_k(gains_sorted, ideal, cutoffs.ndcg_k),
        "mrr": reciprocal_rank(relevant_sorted),
    }
    for k in cutoffs.recall_ks:
        out[f"recall@{k}"] = recall_at_k(relevant_sorted, n_relevant, k)
    return out
