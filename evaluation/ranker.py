"""What a ranking method implements to be evaluated: the :class:`Ranker` protocol and its rows.

The contract, for every method (baselines here, the BERT ranker later):

- ``fit(rows, catalog)`` once, with the training rows and the products they refer to.
- ``score(queries, candidates)`` returns a float array of shape ``(len(queries), len(candidates))``,
  higher = better. It is called in batches. The rows it gets are :meth:`SearchRow.as_query`
  views: the outcome (clicked product, click time, grade) is stripped, so a method cannot peek.
- ``observe(row)`` hands an online method one outcome (a click) once it has happened: after the
  row was scored, and only when the click time is no later than the next query scored.
  Static methods inherit the no-op.
- ``online`` tells the harness whether ``observe`` matters (it then scores one row at a time).

Candidates are :class:`core.events.CatalogProduct`, the same type the scorer sees in production.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

import numpy as np

from core.events import CatalogProduct


@dataclass(frozen=True, slots=True)
class SearchRow:
    """A search and (when known) its outcome.

    Best Buy: one row per click; ``product_id`` is the clicked sku, ``grade`` 1.
    CrowdFlower training: one row per judged pair; ``grade`` = median_relevance - 1 (0..3).
    CrowdFlower test: one row per query, outcome-free (the grades live in the fold).
    """

    query_id: str
    query: str
    user_id: str | None = None
    query_time: datetime | None = None
    click_time: datetime | None = None
    product_id: str | None = None
    grade: int = 0

    def as_query(self) -> SearchRow:
        """This row as a method may see it before its outcome: no product, click time or grade."""
        return dataclasses.replace(self, click_time=None, product_id=None, grade=0)


@runtime_checkable
class Ranker(Protocol):
    name: str
    online: bool

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None: ...

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray: ...

    def observe(self, row: SearchRow) -> None: ...


class BaseRanker:
    """Defaults for the protocol: static (no online updates), nothing to fit."""

    name: str = "base"
    online: bool = False

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None:
        return None

    def observe(self, row: SearchRow) -> None:
        return None
