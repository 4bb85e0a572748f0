"""Metrics against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import metrics
from evaluation.metrics import Cutoffs, per_query


def ranked(scores: list[float]) -> np.ndarray:
    return np.array([scores], dtype=float)


def one_hot(n: int, at: int, grade: int = 1) -> np.ndarray:
    g = np.zeros((1, n), dtype=int)
    g[0, at] = grade
    return g


@pytest.mark.parametrize(("rank", "ap5", "ndcg10", "rr", "r5"), [
    (1, 1.0, 1.0, 1.0, 1.0),
    (2, 1 / 2, 1 / math.log2(3), 1 / 2, 1.0),
    (3, 1 / 3, 1 / 2, 1 / 3, 1.0),
    (5, 1 / 5, 1 / math.log2(6), 1 / 5, 1.0),
    (6, 0.0, 1 / math.log2(7), 1 / 6, 0.0),
    (11, 0.0, 0.0, 1 / 11, 0.0),
])
def test_single_relevant_item(rank: int, ap5: float, ndcg10: float, rr: float, r5: float) -> None:
    scores = ranked([20.0 - i for i in range(20)])  # candidate i is at rank i + 1
    out = per_query(scores, one_hot(20, rank - 1), cutoffs=Cutoffs(recall_ks=(5,)))
    assert out["map@5"][0] == pytest.approx(ap5)
    assert out["ndcg@10"][0] == pytest.approx(ndcg10)
    assert out["mrr"][0] == pytest.approx(rr)
    assert out["recall@5"][0] == pytest.approx(r5)


def test_two_relevant_items_at_ranks_one_and_three() -> None:
    # relevant at ranks 1 and 3: AP = (1/1 + 2/3) / 2; recall@2 = 1/2
    out = per_query(ranked([4, 3, 2, 1]), np.array([[1, 0, 1, 0]]), cutoffs=Cutoffs(recall_ks=(2, 3)))
    assert out["map@5"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["recall@2"][0] == pytest.approx(0.5)
    assert out["recall@3"][0] == pytest.approx(1.0)
    assert out["mrr"][0] == pytest.approx(1.0)
    dcg = 1 + 1 / math.log2(4)
    ideal = 1 + 1 / math.log2(3)
    assert out["ndcg@10"][0] == pytest.approx(dcg / ideal)


def test_map_at_5_divides_by_min_of_k_and_relevant_count() -> None:
    # 6 relevant items, the top 5 all relevant: AP@5 = 5/5 = 1 (not 5/6)
    out = per_query(ranked([9, 8, 7, 6, 5, 4, 3]), np.array([[1, 1, 1, 1, 1, 1, 0]]))
    assert out["map@5"][0] == pytest.approx(1.0)


def test_graded_ndcg_uses_exponential_gain() -> None:
    # ranked grades [0, 1, 0, 2]: DCG = 1/log2(3) + 3/log2(5); ideal [2, 1, 0, 0]: 3 + 1/log2(3)
    out = per_query(ranked([0.1, 0.2, 0.3, 0.4]), np.array([[2, 0, 1, 0]]))
    expected = (1 / math.log2(3) + 3 / math.log2(5)) / (3 + 1 / math.log2(3))
    assert out["ndcg@10"][0] == pytest.approx(expected)


def test_relevant_grade_threshold_binarises_map_mrr_recall() -> None:
    # grades [1, 3]; with relevant_grade=2 only the second item counts (rank 2)
    out = per_query(ranked([2, 1]), np.array([[1, 3]]), relevant_grade=2)
    assert out["map@5"][0] == pytest.approx(0.5)
    assert out["mrr"][0] == pytest.approx(0.5)


def test_no_relevant_item_scores_zero_everywhere() -> None:
    out = per_query(ranked([3, 2, 1]), np.zeros((1, 3), dtype=int))
    assert all(v[0] == 0.0 for v in out.values())
    assert not metrics.has_relevant(np.zeros((1, 3), dtype=int))[0]


def test_mask_excludes_candidates_even_when_they_score_highest() -> None:
    mask = np.array([[False, True, True]])
    out = per_query(ranked([100, 2, 1]), np.array([[1, 0, 1]]), mask)
    # the masked relevant item neither counts as found nor as relevant: only index 2, at rank 2
    assert out["mrr"][0] == pytest.approx(0.5)
    assert out["map@5"][0] == pytest.approx(0.5)
    assert out["recall@10"][0] == pytest.approx(1.0)


def test_ties_are_broken_at_random_not_by_position() -> None:
    n_rows, n_candidates = 4000, 10
    grades = np.zeros((n_rows, n_candidates), dtype=int)
    grades[:, 0] = 1  # the relevant item always listed first
    out = per_query(np.zeros((n_rows, n_candidates)), grades)
    expected_mrr = np.mean([1 / r for r in range(1, n_candidates + 1)])
    assert out["mrr"].mean() == pytest.approx(expected_mrr, abs=0.02)
    again = per_query(np.zeros((n_rows, n_candidates)), grades)
    assert np.array_equal(out["mrr"], again["mrr"])  # deterministic for a seed


def test_vectorised_rows_are_independent() -> None:
    scores = np.array([[3, 2, 1], [1, 2, 3]], dtype=float)
    grades = np.array([[0, 0, 1], [0, 0, 1]])
    out = per_query(scores, grades)
    assert out["mrr"].tolist() == pytest.approx([1 / 3, 1.0])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        per_query(ranked([1.0, float("nan")]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        per_query(ranked([1.0, 2.0]), np.array([[1, 0, 0]]))
