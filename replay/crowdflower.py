"""CrowdFlower Search Results Relevance (Kaggle 2015): graded (query, product) judgements, 10 folds.

``<data_dir>/crowdflower/folds/{1..10}-test.csv.gz`` partition the competition's training set
(10,158 rows, 261 queries); see its SOURCE.md. :func:`load_judgements` returns their union sorted
by id, each row carrying the fold it belongs to, so cross-validation uses the published folds.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Final

FOLDER: Final = "crowdflower"
N_FOLDS: Final = 10


@dataclass(frozen=True, slots=True)
class Judgement:
    """One judged (query, product) pair. ``median_relevance``: 1 (irrelevant) .. 4 (perfect match)."""

    id: int
    query: str
    product_title: str
    product_description: str
    median_relevance: int
    relevance_variance: float
    fold: int

    @property
    def product_id(self) -> str:
        """A product id for the contract: the row id (CrowdFlower has no product ids)."""
        return f"cf-{self.id}"


def fold_path(data_dir: Path, fold: int) -> Path:
    return data_dir / FOLDER / "folds" / f"{fold}-test.csv.gz"


def load_judgements(data_dir: Path) -> list[Judgement]:
    """All judgements of the 10 folds, sorted by id."""
    rows = [row for fold in range(1, N_FOLDS + 1) for row in _load_fold(data_dir, fold)]
    return sorted(rows, key=lambda r: r.id)


def _load_fold(data_dir: Path, fold: int) -> list[Judgement]:
    with gzip.open(fold_path(data_dir, fold), "rt", encoding="utf-8", newline="") as f:
        return [
            Judgement(
                id=int(r["id"]),
                query=r["query"],
                product_title=r["product_title"],
                product_description=r["product_description"],
                median_relevance=int(r["median_relevance"]),
                relevance_variance=float(r["relevance_variance"]),
                fold=fold,
            )
            for r in csv.DictReader(f)
        ]
