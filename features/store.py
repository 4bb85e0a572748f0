"""The feature store interface: the in-memory store (offline training) and the Redis store (online)
implement it and pass one shared test suite, so training and serving see the same features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from core.events import CatalogProduct
from core.settings import FeatureSettings
from features import item
from features.catalog import ProductAttrs
from features.plan import FeatureEvent, Plan, Record
from features.speller import Speller
from features.user import UserState

OnRejected = Callable[[list[tuple[int, str]]], None]


@dataclass(frozen=True)
class Outcome:
    """What a batch did. ``rejected``: (index in the batch, reason), e.g. an unknown product;
    ``skipped``: indices of redeliveries and duplicates; ``unknown_impressions``: (query id,
    product ids) a result showed that the catalog does not know (its other products counted)."""

    applied: int
    duplicates: int
    rejected: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    unknown_impressions: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass(frozen=True)
class Rows:
    """Fixed-layout states of some ids, one row each, as the read path computes on them: ``ids[i]``
    has ``states[i]`` (float64, zeros when it has none) and ``present[i]`` says whether it had one."""

    ids: Sequence[str]
    states: np.ndarray  # float64 [len(ids), layout size]
    present: np.ndarray  # bool [len(ids)]

    @classmethod
    def of(cls, ids: Sequence[str], found: Sequence[tuple[float, ...] | None],
           empty: tuple[float, ...]) -> Rows:
        """From each id's state or None (the memory store)."""
        states = np.array([empty if st is None else st for st in found], dtype=np.float64)
        states = states.reshape(len(ids), len(empty))
        return cls(ids, states, np.array([st is not None for st in found], dtype=bool))

    def take(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The states and presence of ``ids`` (each one of ``self.ids``), in that order."""
        if ids is self.ids or list(ids) == list(self.ids):
            return self.states, self.present
        index = {pid: i for i, pid in enumerate(self.ids)}
        rows = np.fromiter((index[pid] for pid in ids), dtype=np.intp, count=len(ids))
        return self.states[rows], self.present[rows]

    @classmethod
    def merged(cls, parts: Sequence[Rows], merge: Callable[[np.ndarray], np.ndarray]) -> Rows:
        """The owner shards' rows of the same ids (:class:`features.keys.Shards`) as one."""
        if len(parts) == 1:
            return parts[0]
        states = merge(np.stack([part.states for part in parts]))
        return cls(parts[0].ids, states, np.logical_or.reduce([part.present for part in parts]))

    def as_dict(self) -> dict[str, tuple[float, ...]]:
        rows = zip(self.ids, self.states.tolist(), self.present.tolist(), strict=True)
        return {i: tuple(st) for i, st, there in rows if there}


@dataclass
class Snapshot:
    """Raw stored states the read path turns into features (absent keys missing).

    ``item_rows``: the products' statistics (:mod:`features.item`) in the order asked;
    ``evidence``: per query text (or word key), what followed it (:mod:`features.query_item`) for
    the products asked with it; ``query_totals``: the totals of the texts that have them."""

    users: dict[str, UserState] = field(default_factory=dict)
    products: dict[str, ProductAttrs] = field(default_factory=dict)
    item_rows: Rows = field(default_factory=lambda: Rows((), np.zeros((0, item.SIZE)), np.zeros(0, bool)))
    evidence: dict[str, Rows] = field(default_factory=dict)
    query_totals: dict[str, tuple[float, ...]] = field(default_factory=dict)
    category_prices: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def items(self) -> dict[str, tuple[float, ...]]:
        """The statistics of the products asked that have some (tests, audits)."""
        return self.item_rows.as_dict()


def outcome(done: list[tuple[list[int], Plan]]) -> Outcome:
    """One outcome of a batch from its shards' plans (``indices``: each plan's records in the batch)."""
    rejected, skipped, unknown = [], [], []
    for indices, p in done:
        rejected += [(indices[i], why) for i, why in p.rejected]
        skipped += [indices[i] for i in p.skipped]
        unknown += p.unknown_impressions
    return Outcome(sum(p.n_applied for _, p in done), sum(p.duplicates for _, p in done),
                   sorted(rejected), sorted(skipped), unknown)


class FeatureStore(Protocol):
    config: FeatureSettings

    def apply_batch(self, records: Sequence[Record], on_rejected: OnRejected | None = None) -> Outcome:
        """Apply events in order, atomically and idempotently (by event id and by Kafka offset).

        ``on_rejected`` is called with the (index, reason) of the events the batch rejects before
        the batch is committed (each at most once per call), so a caller can hand them over
        (dead-letter topic) before their offsets count as done.
        """
        ...

    def apply(self, event: FeatureEvent) -> Outcome:
        """Apply one event (offline: call in event-time order)."""
        ...

    def snapshot(
        self, users: Iterable[str], products: Sequence[str], evidence: Mapping[str, Sequence[str]]
    ) -> Snapshot:
        """Everything the read path needs for these shoppers and products (distinct, in this
        order: ``Snapshot.item_rows``), and for each query text (or word key) of ``evidence`` what
        followed it for the products given with it, in one round trip."""
        ...

    def speller(self) -> Speller:
        """The dictionary of query words that respells untrusted ones (:mod:`features.speller`):
        live offline, reloaded every ``spelling_refresh_s`` online."""
        ...

    def forget(self, user_id: str, at: float) -> None:
        """Remove a shopper; their events up to ``at`` (event time) are ignored from now on."""
        ...

    def user(self, user_id: str) -> UserState | None: ...

    def products(self, product_ids: Sequence[str]) -> dict[str, CatalogProduct]:
        """The catalog documents of these products as the catalog last sent them (unknown and
        unreadable ones absent), e.g. the texts a re-ranker reads."""
        ...

    def item(self, product_id: str) -> tuple[float, ...]:
        """A product's statistics (:mod:`features.item` layout; zeros when unknown)."""
        ...

    def users(self) -> dict[str, UserState]:
        """Every stored shopper (tests, audits: not for serving)."""
        ...
