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


# --- cross-checked against trec_eval (pytrec_eval, through ir-measures) on the same runs ---------
#
# How trec_eval defines what ours defines otherwise, and how the runs are aligned:
# - ties: trec_eval orders equal scores by document id; ours breaks them at random (seed). Each
#   candidate is handed to it with minus its rank in our rank_order as its score: the same ranking.
# - masked candidates are in neither the run nor the judgements.
# - a query without a relevant candidate: trec_eval leaves out a query it has no judgement for;
#   every allowed candidate is judged here (grade 0 included), so it scores such a query, 0 on
#   every measure, as ours does.
# - MAP@5: trec_eval's AP@5 divides by all the query's relevant items R; ours by min(5, R) (the
#   Kaggle Best Buy MAP@5), so ours = trec_eval's * R / min(5, R).
# - NDCG: trec_eval's gain is the grade unless given a table: given 2^grade - 1, as ours; the
#   ideal ordering is over the judged (= allowed) candidates in both.
# - relevant (AP, RR, recall) = grade >= relevant_grade: trec_eval's rel= parameter.


def trec_eval(scores: np.ndarray, grades: np.ndarray, mask: np.ndarray, relevant_grade: int,
              seed: int = 0) -> dict[str, np.ndarray]:
    import ir_measures
    from ir_measures import AP, RR, Qrel, R, ScoredDoc, nDCG

    order = metrics.rank_order(scores, mask, seed)
    run, qrels = [], []
    for i, row in enumerate(order):
        for rank, j in enumerate(row):
            if mask[i, j]:
                run.append(ScoredDoc(f"q{i}", f"d{j}", -float(rank)))
                qrels.append(Qrel(f"q{i}", f"d{j}", int(grades[i, j])))
    gains = {g: 2**g - 1 for g in range(int(grades.max()) + 1)}
    measures = {"map@5": AP(rel=relevant_grade) @ 5, "ndcg@10": nDCG(gains=gains) @ 10,
                "mrr": RR(rel=relevant_grade), "recall@10": R(rel=relevant_grade) @ 10,
                "recall@50": R(rel=relevant_grade) @ 50}
    by_measure = {m: name for name, m in measures.items()}
    out = {name: np.full(len(scores), np.nan) for name in measures}
    for value in ir_measures.pytrec_eval.iter_calc(list(measures.values()), qrels, run):
        out[by_measure[value.measure]][int(value.query_id[1:])] = value.value
    n_relevant = ((grades >= relevant_grade) & mask).sum(axis=1)
    out["map@5"] *= np.divide(n_relevant, np.minimum(n_relevant, 5), out=np.zeros(len(scores)),
                              where=n_relevant > 0)
    return out


def random_run(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Few distinct scores (many ties), grades 0-3 mostly 0, a tenth of the rows with nothing
    relevant, a fifth of the candidates masked out (every row keeps one)."""
    scores = rng.integers(0, 5, (n, m)).astype(float)
    grades = np.where(rng.random((n, m)) < 0.8, 0, rng.integers(1, 4, (n, m)))
    grades[rng.random(n) < 0.1] = 0
    mask = rng.random((n, m)) > 0.2
    mask[:, 0] = True
    return scores, grades, mask


def bestbuy_like_run(rng: np.random.Generator, n: int, m: int = 437) -> tuple[np.ndarray, ...]:
    """One clicked product per search among the whole catalog (none for 3%: a product the
    catalog lacks); scores are click counts, heavy-tailed, most of them tied at 0."""
    popularity = np.floor(rng.zipf(1.6, m) - 1).clip(0, 500)
    scores = np.tile(popularity, (n, 1)) + (rng.random((n, m)) < 0.02) * 100.0  # the query's own
    grades = np.zeros((n, m), dtype=int)
    clicked = rng.choice(m, n, p=(popularity + 1) / (popularity + 1).sum())
    grades[np.arange(n), clicked] = 1
    grades[rng.random(n) < 0.03] = 0
    return scores, grades, np.ones((n, m), dtype=bool)


def crowdflower_like_run(rng: np.random.Generator, n: int, m: int = 60) -> tuple[np.ndarray, ...]:
    """About ten judged products per query (the mask), grades 0-3 (median relevance - 1), scores
    that follow the grade noisily."""
    mask = rng.random((n, m)) < 10 / m
    mask[:, 0] = True
    grades = rng.choice(4, (n, m), p=[0.08, 0.15, 0.17, 0.6]) * mask
    scores = grades + rng.normal(0, 1.5, (n, m))
    return scores, grades, mask


@pytest.mark.parametrize(("run", "relevant_grade"), [
    ("random", 1), ("random", 2), ("bestbuy_like", 1), ("crowdflower_like", 2),
])
def test_metrics_agree_with_trec_eval(run: str, relevant_grade: int) -> None:
    make = {"random": lambda r: random_run(r, 400, 40), "bestbuy_like": lambda r: bestbuy_like_run(r, 300),
            "crowdflower_like": lambda r: crowdflower_like_run(r, 400)}[run]
    scores, grades, mask = make(np.random.default_rng(7))
    ours = per_query(scores, grades, mask, relevant_grade=relevant_grade)
    reference = trec_eval(scores, grades, mask, relevant_grade)
    if run != "crowdflower_like":  # these runs hold queries with nothing relevant
        assert not metrics.has_relevant(grades, mask, relevant_grade).all()
    for name in ("map@5", "ndcg@10", "mrr", "recall@10", "recall@50"):
        np.testing.assert_allclose(ours[name], reference[name], atol=1e-9, err_msg=name)
