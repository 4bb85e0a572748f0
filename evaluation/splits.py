"""The evaluation splits: Best Buy by time, CrowdFlower by its 10 published folds.

Best Buy (:func:`bestbuy_split`): click rows sorted by (query time, query id, click id); the last
20% are the test set, scored in that order. The candidate set is the whole catalog (437
products). A test click on a sku the catalog lacks stays in the test set as a miss (0 on every
metric), so no number is inflated by dropping what no method can get right. Training rows are
the clicks whose query *and* click came before the cutoff (the first test query time); rows
queried before the cutoff but clicked after it (``late``) are never scored and reach online
methods through ``observe`` at their click time.

CrowdFlower (:func:`crowdflower_folds`): for fold k, train on the judgements of the other nine
folds; test one row per distinct query of fold k, ranking that query's products judged in fold k.
A product is relevant when median_relevance >= 3 (grade >= 2); queries of a fold with no
relevant product are left out (no ranking can differ there).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np

from core.events import CatalogProduct
from evaluation.ranker import SearchRow
from replay import bestbuy, crowdflower
from replay.bestbuy import ClickRow, stable_id
from replay.crowdflower import Judgement
from replay.to_events import catalog_product

TEST_FRACTION: Final = 0.2
CROWDFLOWER_RELEVANT_GRADE: Final = 2  # median_relevance >= 3
_CROWDFLOWER_TIME: Final = datetime(2015, 5, 11, tzinfo=UTC)  # the competition's launch; no times given


@dataclass(frozen=True)
class BestBuySplit:
    catalog: dict[str, CatalogProduct]
    train: list[SearchRow]
    late: list[SearchRow]
    test: list[SearchRow]
    cutoff: datetime


@dataclass(frozen=True)
class CrowdFlowerFold:
    fold: int
    train: list[SearchRow]
    train_catalog: dict[str, CatalogProduct]
    queries: list[SearchRow]
    candidates: list[CatalogProduct]
    grades: np.ndarray  # (n_queries, n_candidates), grade of each judged pair, 0 elsewhere
    mask: np.ndarray  # (n_queries, n_candidates), True where the query's product was judged


# --- Best Buy ---------------------------------------------------------------------------------


def bestbuy_split(data_dir: Path, test_fraction: float = TEST_FRACTION) -> BestBuySplit:
    """The time split of the Best Buy clicks (see the module docstring)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    products = bestbuy.load_catalog(data_dir)
    rows = sorted(bestbuy.load_clicks(data_dir), key=lambda r: (r.query_time, r.query_id, r.click_id))
    first_test = len(rows) - round(len(rows) * test_fraction)
    cutoff = rows[first_test].query_time
    before, start = rows[:first_test], rows[0].query_time
    return BestBuySplit(
        catalog={sku: catalog_product(p, start) for sku, p in products.items()},
        train=[click_row(r) for r in before if r.click_time <= cutoff],
        late=[click_row(r) for r in before if r.click_time > cutoff],
        test=[click_row(r) for r in rows[first_test:]],
        cutoff=cutoff,
    )


def click_row(r: ClickRow) -> SearchRow:
    return SearchRow(
        query_id=r.query_id,
        query=r.query,
        user_id=r.user_id,
        query_time=r.query_time,
        click_time=r.click_time,
        product_id=r.sku,
        grade=1,
    )


# --- CrowdFlower ------------------------------------------------------------------------------


def crowdflower_folds(data_dir: Path) -> list[CrowdFlowerFold]:
    """The 10 cross-validation folds, each with its training rows and its test queries."""
    judgements = crowdflower.load_judgements(data_dir)
    return [_fold(k, judgements) for k in range(1, crowdflower.N_FOLDS + 1)]


def _fold(k: int, judgements: list[Judgement]) -> CrowdFlowerFold:
    train = [j for j in judgements if j.fold != k]
    test = [j for j in judgements if j.fold == k]
    queries = list(dict.fromkeys(j.query for j in test))
    q_index = {q: i for i, q in enumerate(queries)}
    grades = np.zeros((len(queries), len(test)), dtype=np.int64)
    mask = np.zeros_like(grades, dtype=bool)
    for col, j in enumerate(test):
        grades[q_index[j.query], col] = j.median_relevance - 1
        mask[q_index[j.query], col] = True
    return CrowdFlowerFold(
        fold=k,
        train=[_judged_row(j) for j in train],
        train_catalog={j.product_id: crowdflower_product(j) for j in train},
        queries=[SearchRow(query_id=crowdflower_query_id(q), query=q) for q in queries],
        candidates=[crowdflower_product(j) for j in test],
        grades=grades,
        mask=mask,
    )


def _judged_row(j: Judgement) -> SearchRow:
    return SearchRow(
        query_id=crowdflower_query_id(j.query), query=j.query, product_id=j.product_id,
        grade=j.median_relevance - 1,
    )


def crowdflower_query_id(query: str) -> str:
    return stable_id("crowdflower-query", query)


def crowdflower_product(j: Judgement) -> CatalogProduct:
    """A judged product as the contract's product (its id is the judgement's row id)."""
    return CatalogProduct(
        product_id=j.product_id,
        title=j.product_title,
        description=j.product_description,
        updated_at=_CROWDFLOWER_TIME,
    )
