"""The feature store interface: the in-memory store (offline training) and the Redis store (online)
implement it and pass one shared test suite, so training and serving see the same features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.events import CatalogProduct
from core.settings import FeatureSettings
from features.catalog import ProductAttrs
from features.plan import FeatureEvent, Record
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


@dataclass
class Snapshot:
    """Raw stored states the read path turns into features (absent keys missing)."""

    users: dict[str, UserState] = field(default_factory=dict)
    products: dict[str, ProductAttrs] = field(default_factory=dict)
    items: dict[str, tuple[float, ...]] = field(default_factory=dict)
    query_items: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)
    query_totals: dict[str, tuple[float, ...]] = field(default_factory=dict)
    category_prices: dict[str, tuple[int, int]] = field(default_factory=dict)


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
        self, users: Iterable[str], products: Iterable[str], pairs: Iterable[tuple[str, str]]
    ) -> Snapshot:
        """Everything the read path needs for these shoppers, products and (query text, product)
        pairs, in one round trip."""
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
