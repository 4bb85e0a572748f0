"""Point-in-time training lists from Best Buy searches and clicks.

Events are replayed through the in-memory feature store in event time: a search at its query
time, a click at its click time. When a search happens, its features are read *before* it is
applied, exactly as the scorer reads them when the query arrives, and every product clicked
after it is a positive (grade 1). So training sees only what was knowable when the shopper
searched, and sees it through the same read path (``features.read``) the scorer serves from.

Each list holds the positives, the products clicked before after the same query text and after
each of its words, the products whose pretrained embedding is closest to the query, and random
products, up to ``list_size``; validation lists hold the whole catalog, as the evaluation ranks it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import numpy as np
import structlog

from core.events import Click, Query
from core.progress import progress as progress_bar
from core.text import normalize_query, query_words
from evaluation.ranker import SearchRow
from features import query_item
from features.memory import MemoryStore
from features.read import FEATURE_NAMES, Request, read_batch
from replay import to_events
from trainer.fit import Examples

log = structlog.get_logger(__name__)


def query_event(row: SearchRow) -> Query:
    """A Best Buy search row as the replay publishes it (:func:`replay.to_events.query_event`)."""
    return to_events.query_event(query_id=row.query_id, user_id=row.user_id or "anonymous", text=row.query,
                                 query_time=_t(row.query_time))


def click_event(row: SearchRow) -> Click:
    """A Best Buy click row as the replay publishes it, same event id
    (:func:`replay.to_events.click_event`; training reads no click price)."""
    return to_events.click_event(query_id=row.query_id, user_id=row.user_id or "anonymous",
                                 sku=row.product_id or "", query=row.query, query_time=_t(row.query_time),
                                 click_time=_t(row.click_time))


def _t(ts: datetime | None) -> datetime:
    if ts is None:
        raise ValueError("a Best Buy row without a time")
    return ts


@dataclass
class Catalog:
    """The products a version knows, in embedding-table order (the table's last row is zeros)."""

    product_ids: list[str]
    embeddings: np.ndarray  # [P, D], L2-normalized
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {p: i for i, p in enumerate(self.product_ids)}

    @property
    def unknown_row(self) -> int:
        return len(self.product_ids)

    def rows(self, product_ids: Sequence[str]) -> list[int]:
        return [self.index.get(p, self.unknown_row) for p in product_ids]

    def table(self) -> np.ndarray:
        return np.vstack([self.embeddings, np.zeros((1, self.embeddings.shape[1]), np.float32)])


def history(result_products: Sequence[str], weights: np.ndarray, catalog_index: dict[str, int],
            unknown_row: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The shopper's strongest recent products as embedding rows and weights, padded to ``length``."""
    idx = np.full(length, unknown_row, dtype=np.int64)
    w = np.zeros(length, dtype=np.float32)
    n = min(length, len(result_products))
    idx[:n] = [catalog_index.get(p, unknown_row) for p in result_products[:n]]
    w[:n] = weights[:n]
    return idx, w


def timeline(rows: Sequence[SearchRow]) -> Iterator[tuple[str, SearchRow | list[SearchRow]]]:
    """("search", rows of one search) at query time and ("click", row) at click time, in time order."""
    searches: dict[str, list[SearchRow]] = defaultdict(list)
    for row in rows:
        searches[row.query_id].append(row)
    events: list[tuple[datetime, int, str, object]] = []
    for group in searches.values():
        events.append((_t(group[0].query_time), 0, "search", group))
        events.extend((_t(r.click_time), 1, "click", r) for r in group)
    events.sort(key=lambda e: (e[0], e[1]))
    for _, _, kind, payload in events:
        yield kind, payload  # type: ignore[misc]


class ListBuilder:
    """Builds the ranking lists while the store replays history."""

    def __init__(self, catalog: Catalog, query_vectors: dict[str, np.ndarray], list_size: int,
                 history_len: int, seed: int) -> None:
        self.catalog = catalog
        self.index = catalog.index
        self.query_vectors = query_vectors
        self.list_size = list_size
        self.history_len = history_len
        self.rng = np.random.default_rng(seed)
        self.clicked_after: dict[str, dict[str, int]] = defaultdict(dict)

    def candidates(self, text: str, positives: set[str], full: bool, words: Sequence[str] = ()) -> list[str]:
        if full:
            return list(self.catalog.product_ids)
        chosen = dict.fromkeys(p for p in positives if p in self.index)
        self._most_clicked(chosen, text, 16)
        for word in words:  # what each word led to: the hard cases of a query never seen whole
            self._most_clicked(chosen, query_item.word_key(word), 8)
        sims = self.catalog.embeddings @ self.query_vectors[text]
        for i in np.argsort(-sims)[:16]:
            chosen.setdefault(self.catalog.product_ids[i])
        while len(chosen) < min(self.list_size, len(self.catalog.product_ids)):
            chosen.setdefault(self.catalog.product_ids[self.rng.integers(len(self.catalog.product_ids))])
        return list(chosen)[: self.list_size]

    def _most_clicked(self, chosen: dict[str, None], key: str, n: int) -> None:
        seen = self.clicked_after.get(key, {})
        for pid, _ in sorted(seen.items(), key=lambda kv: -kv[1])[:n]:
            if pid in self.index:
                chosen.setdefault(pid)

    def remember_click(self, row: SearchRow) -> None:
        pid = row.product_id or ""
        for key in query_item.evidence_keys(query_item.stored_text(row.query)):
            counts = self.clicked_after[key]
            counts[pid] = counts.get(pid, 0) + 1


# The role of each list build_lists returns.
TRAIN: Final = 0  # a training list (hard negatives and random fill)
VALIDATE: Final = 1  # a search at or after ``full_from``, over the whole catalog
REFIT: Final = 2  # the same search as a training list, for a final fit on the whole period


def build_lists(rows: Sequence[SearchRow], store: MemoryStore, builder: ListBuilder,
                full_from: datetime | None = None, progress: bool = True) -> tuple[Examples, np.ndarray]:
    """Replay ``rows`` through ``store``; lists per search (see module docstring), and their roles.

    A search before ``full_from`` gives one TRAIN list; one at or after it a VALIDATE list (the
    whole catalog as candidates) and a REFIT list (its training list, features from the same read).
    """
    texts: dict[str, int] = {}
    lists: list[tuple[int, list[str], set[str], np.ndarray, np.ndarray, np.ndarray]] = []
    roles: list[int] = []
    rejected, first_reason = 0, None
    n_search = len({r.query_id for r in rows})
    bar = progress_bar(total=n_search, desc="point-in-time lists", unit="search", enabled=progress,
                       leave=False)
    for kind, payload in timeline(rows):
        if kind == "click":
            row = payload  # type: ignore[assignment]
            outcome = store.apply(click_event(row))
            rejected += len(outcome.rejected)
            if outcome.rejected and first_reason is None:
                first_reason = outcome.rejected[0][1]
            builder.remember_click(row)
            continue
        group: list[SearchRow] = payload  # type: ignore[assignment]
        first = group[0]
        text, words = normalize_query(first.query), query_words(first.query)
        positives = {r.product_id for r in group if r.product_id}
        full = full_from is not None and _t(first.query_time) >= full_from
        cands = builder.candidates(text, positives, full, words)
        now = _t(first.query_time).timestamp()
        result = read_batch(store, [Request(first.user_id or "anonymous", text, cands, words=words)], now)[0]
        hist_idx, hist_w = history(result.recent_products, result.recent_weights, builder.index,
                                   builder.catalog.unknown_row, builder.history_len)
        text_id = texts.setdefault(first.query, len(texts))
        lists.append((text_id, cands, positives, result.features, hist_idx, hist_w))
        roles.append(VALIDATE if full else TRAIN)
        if full:  # full candidates are the catalog in table order: a training list is some of its rows
            narrow = builder.candidates(text, positives, False, words)
            rows_of = builder.catalog.rows(narrow)
            lists.append((text_id, narrow, positives, result.features[rows_of], hist_idx, hist_w))
            roles.append(REFIT)
        store.apply(query_event(first))
        bar.update(1)
    bar.close()
    if rejected:
        log.warning("clicks_rejected", count=rejected, first_reason=first_reason)
    return _stack(list(texts), lists, builder), np.array(roles, dtype=np.int8)


def _stack(texts: list[str], lists: list, builder: ListBuilder) -> Examples:
    width = max((len(c) for _, c, *_ in lists), default=1)
    n, f = len(lists), len(FEATURE_NAMES)
    ex = Examples(
        texts=texts,
        text_id=np.zeros(n, np.int64),
        cand_idx=np.full((n, width), builder.catalog.unknown_row, np.int64),
        grades=np.zeros((n, width), np.int64),
        dense=np.zeros((n, width, f), np.float32),
        hist_idx=np.zeros((n, builder.history_len), np.int64),
        hist_w=np.zeros((n, builder.history_len), np.float32),
        valid=np.zeros((n, width), bool),
    )
    for i, (text_id, cands, positives, dense, hist_idx, hist_w) in enumerate(lists):
        k = len(cands)
        ex.text_id[i] = text_id
        ex.cand_idx[i, :k] = builder.catalog.rows(cands) if k else []
        ex.grades[i, :k] = [1 if c in positives else 0 for c in cands]
        ex.dense[i, :k] = dense
        ex.hist_idx[i], ex.hist_w[i] = hist_idx, hist_w
        ex.valid[i, :k] = True
    return ex
