"""Baselines, each a small :class:`~evaluation.ranker.Ranker`; every model here must beat them.

- ``random``: uniform random scores.
- ``popular``: clicks per product in training (static).
- ``popular_decayed``: clicks weighted by recency (half-life 7 days), updated online.
- ``query_table``: normalized query text -> products clicked after it, most clicked first, global
  popularity to fill in; ``query_table_online`` also learns from each test click once observed.
- ``bm25``: BM25 (bm25s, Lucene variant) between the query and the product's long text.
- ``minilm``: zero-shot all-MiniLM-L6-v2 cosine between query text and the product's long text
  (:func:`core.text.product_long_text`: title and whole description).

Clicks on products outside the candidate set are counted but can never be ranked.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import numpy as np

from core.events import CatalogProduct
from core.text import normalize_query, product_long_text, words
from evaluation.ranker import BaseRanker, SearchRow

DAY_S = 86_400.0


class RandomRanker(BaseRanker):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        return self._rng.random((len(queries), len(candidates)))


class _CountingRanker(BaseRanker):
    """Learns by counting clicks: every training row, and each test row after it is scored when
    online. Subclasses say what one row adds (``_add``)."""

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None:
        for row in rows:
            self._add(row)

    def observe(self, row: SearchRow) -> None:
        if self.online:
            self._add(row)

    def _add(self, row: SearchRow) -> None:
        raise NotImplementedError


class PopularRanker(_CountingRanker):
    """Click counts per product; with ``half_life_days`` each click weighs 2^((t - t0) / half-life).

    Decay by a common factor does not change the order, so weights grow with time instead of
    old clicks shrinking (t0 = the first click seen; the exponent stays small over months).
    """

    def __init__(self, half_life_days: float | None = None, online: bool = False) -> None:
        self.name = "popular" if half_life_days is None else "popular_decayed"
        self.online = online
        self._half_life_s = half_life_days * DAY_S if half_life_days else None
        self._origin: datetime | None = None
        self.weights: defaultdict[str, float] = defaultdict(float)

    def _add(self, row: SearchRow) -> None:
        if row.product_id is None:
            return
        self.weights[row.product_id] += self._weight(row.click_time or row.query_time)

    def _weight(self, ts: datetime | None) -> float:
        if self._half_life_s is None or ts is None:
            return 1.0
        self._origin = self._origin or ts
        return math.exp2((ts - self._origin).total_seconds() / self._half_life_s)

    def vector(self, candidates: Sequence[CatalogProduct]) -> np.ndarray:
        return np.array([self.weights.get(c.product_id, 0.0) for c in candidates], dtype=np.float64)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        return np.tile(self.vector(candidates), (len(queries), 1))


class QueryTableRanker(_CountingRanker):
    """normalized query -> clicked products by count; popularity (scaled into [0, 1)) breaks ties."""

    def __init__(self, online: bool = False) -> None:
        self.name = "query_table_online" if online else "query_table"
        self.online = online
        self.table: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.popular = PopularRanker(online=True)

    def _add(self, row: SearchRow) -> None:
        if row.product_id is not None:
            self.table[normalize_query(row.query)][row.product_id] += 1
            self.popular.observe(row)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        column = {c.product_id: i for i, c in enumerate(candidates)}
        popularity = self.popular.vector(candidates)
        scores = np.tile(popularity / (popularity.max() + 1.0), (len(queries), 1))
        for row_index, query in enumerate(queries):
            for product_id, count in self.table.get(normalize_query(query.query), {}).items():
                if (col := column.get(product_id)) is not None:
                    scores[row_index, col] += count
        return scores


class BM25Ranker(BaseRanker):
    """BM25 over :func:`core.text.product_long_text`, tokenized as queries are normalized, English
    stopwords out."""

    name = "bm25"

    def __init__(self) -> None:
        self._index: tuple[tuple[str, ...], Any] | None = None

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        index = self._index_for(candidates)
        by_text = {q.query: index.get_scores(_tokens(q.query)) for q in queries}
        return np.stack([by_text[q.query] for q in queries]).astype(np.float64)

    def _index_for(self, candidates: Sequence[CatalogProduct]) -> Any:
        import bm25s

        ids = tuple(c.product_id for c in candidates)
        if self._index is None or self._index[0] != ids:
            index = bm25s.BM25()
            index.index([_tokens(product_long_text(c)) for c in candidates], show_progress=False)
            self._index = (ids, index)
        return self._index[1]


def _tokens(text: str) -> list[str]:
    return [t for t in words(text) if t not in _stopwords()]


@cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


class MiniLMRanker(BaseRanker):
    """Zero-shot cosine similarity of all-MiniLM-L6-v2 sentence embeddings (CPU or GPU).

    Texts are cut at 128 word pieces, the length the model was fine-tuned with (its config
    allows 256): the title comes first, and encoding costs about half as much.
    """

    name = "minilm"

    def __init__(self, batch_size: int = 64, max_seq_length: int = 128) -> None:
        self._batch_size = batch_size
        self._max_seq_length = max_seq_length
        self._candidates: tuple[tuple[str, ...], np.ndarray] | None = None

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        return self._encode([q.query for q in queries]) @ self._candidate_vectors(candidates).T

    def _candidate_vectors(self, candidates: Sequence[CatalogProduct]) -> np.ndarray:
        ids = tuple(c.product_id for c in candidates)
        if self._candidates is None or self._candidates[0] != ids:
            self._candidates = (ids, self._encode([product_long_text(c) for c in candidates]))
        return self._candidates[1]

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text; each distinct text is encoded once."""
        encoder = minilm_encoder()
        encoder.max_seq_length = self._max_seq_length
        unique = list(dict.fromkeys(texts))
        vectors = encoder.encode(
            unique, batch_size=self._batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float64)
        row = {text: i for i, text in enumerate(unique)}
        return vectors[[row[t] for t in texts]]


@cache
def minilm_encoder() -> Any:
    """The sentence-transformers model, loaded once per process from the verified package files."""
    from sentence_transformers import SentenceTransformer

    from core.pretrained import minilm_path

    return SentenceTransformer(str(minilm_path()), local_files_only=True)
