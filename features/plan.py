"""From a batch of events to the writes they cause: the one place where events meet feature rules.

A store reads what the batch needs (:func:`needs`, then :func:`categories_needed`) into a
:class:`View`, calls :func:`plan`, and commits the :class:`Plan` atomically. The memory store and
the Redis store share this code; they differ only in how they read and commit.

Idempotency: a record whose Kafka offset is not above the last offset committed for its partition
is a redelivery; an event whose id already has an "applied" marker is a duplicate. Both are
skipped. Shopper and product states are read-modify-written (each is owned by one partition);
product, query-product and category statistics are commutative operations the store applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from core.events import CatalogProduct, Query, RankedResult
from core.events import Interaction as InteractionT
from core.events import encode as encode_event
from core.settings import FeatureSettings
from features import catalog, keys, query_item, user
from features.catalog import ProductAttrs
from features.keys import Shards
from features.user import KIND_OF, UserState

FeatureEvent = Query | RankedResult | CatalogProduct | InteractionT


class Source(NamedTuple):
    """Where a record was read from; None for events applied offline. (Named tuples, not frozen
    dataclasses: a worker builds one per event, and they are five times cheaper to make.)"""

    topic: str
    partition: int
    offset: int


class Record(NamedTuple):
    event: FeatureEvent
    source: Source | None = None


@dataclass
class Needs:
    users: set[str] = field(default_factory=set)
    products: set[str] = field(default_factory=set)
    markers: set[str] = field(default_factory=set)
    partitions: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class View:
    """The stored state a batch depends on (absent keys simply missing)."""

    users: dict[str, UserState] = field(default_factory=dict)
    tombstones: dict[str, float] = field(default_factory=dict)
    products: dict[str, ProductAttrs] = field(default_factory=dict)
    category_prices: dict[str, tuple[int, int]] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass
class Plan:
    users: dict[str, UserState] = field(default_factory=dict)
    products: dict[str, ProductAttrs] = field(default_factory=dict)
    product_docs: dict[str, bytes] = field(default_factory=dict)
    price_deltas: dict[str, tuple[int, int]] = field(default_factory=dict)
    items: list[tuple[str, int, float]] = field(default_factory=list)  # (product, kind, t)
    # One entry per shown result, (t, product ids): a third of all events, each showing ~10
    # products, so they travel compactly. Stores apply them after ``items``.
    impressions: list[tuple[float, list[str]]] = field(default_factory=list)
    # (query id, product ids the catalog does not know) of results whose known products were counted
    unknown_impressions: list[tuple[str, list[str]]] = field(default_factory=list)
    queries: list[tuple[str, str]] = field(default_factory=list)  # (query id, query_item.stored_text)
    query_items: list[tuple[str, str, int, float]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # indices of redeliveries and duplicates

    @property
    def n_applied(self) -> int:
        return len(self.applied)

    @property
    def duplicates(self) -> int:
        return len(self.skipped)


def marker(event: FeatureEvent) -> str | None:
    """The "applied" marker key of an event; catalog updates are idempotent by themselves."""
    kind = type(event)  # exact types of the contract: cheaper than isinstance chains per event
    if kind in KIND_OF:
        return keys.applied("e", event.event_id)  # type: ignore[union-attr]
    if kind is Query:
        return keys.applied("q", event.query_id)  # type: ignore[union-attr]
    if kind is RankedResult:
        return keys.applied("r", event.query_id)  # type: ignore[union-attr]
    return None


def owner(event: FeatureEvent) -> str:
    """The id whose owner shard (:class:`features.keys.Shards`) takes all of an event's writes:
    the product of a catalog update, the shopper of everything else."""
    return event.product_id if type(event) is CatalogProduct else event.user_id  # type: ignore[union-attr]


def phases(records: Sequence[Record], shards: Shards) -> list[list[int]]:
    """The indices of a batch's records in the order its commits go. With owner shards, the
    catalog updates first, then the shopper events: a click reads the attributes of its product,
    whose state is another shard's, so it must be there before (one shard's commit cannot wait
    for another's). The two are different topics, whose relative order Kafka does not keep
    anyway. With one shard, one commit, in record order."""
    everything = list(range(len(records)))
    if shards.n == 1:
        return [everything]
    catalog_first = [i for i in everything if type(records[i].event) is CatalogProduct]
    rest = [i for i in everything if type(records[i].event) is not CatalogProduct]
    return [p for p in (catalog_first, rest) if p]


def by_shard(records: Sequence[Record], indices: Sequence[int], shards: Shards) -> dict[int, list[int]]:
    """``indices`` (of ``records``) per owner shard, in order; every shard when they came from
    Kafka: each shard records the partition ends of all of them (see :func:`plan`)."""
    groups: dict[int, list[int]] = {}
    if any(records[i].source is not None for i in indices):
        groups = {s: [] for s in range(shards.n)}
    for i in indices:
        groups.setdefault(shards.of(owner(records[i].event)), []).append(i)
    return groups


def ends(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    """The highest offset of each partition in ``records``."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        if r.source is not None and r.source.offset > out.get((r.source.topic, r.source.partition), -1):
            out[r.source.topic, r.source.partition] = r.source.offset
    return out


def needs(records: list[Record]) -> Needs:
    n = Needs()
    for ev, source in records:
        if source is not None:
            n.partitions.add((source.topic, source.partition))
        m = marker(ev)
        if m is not None:
            n.markers.add(m)
        kind = type(ev)
        if kind is CatalogProduct:
            n.products.add(ev.product_id)  # type: ignore[union-attr]
        elif kind is Query:
            n.users.add(ev.user_id)  # type: ignore[union-attr]
        elif kind is RankedResult:
            n.products.update([p.product_id for p in ev.products])  # type: ignore[union-attr]
        else:
            n.users.add(ev.user_id)  # type: ignore[union-attr]
            n.products.add(ev.product_id)  # type: ignore[union-attr]
    return n


def reads_prices(event: FeatureEvent) -> bool:
    """Whether applying ``event`` reads or changes category typical prices: an interaction (the
    shopper's price level against its category's) or a catalog update."""
    kind = type(event)
    return kind in KIND_OF or kind is CatalogProduct


def categories_needed(records: list[Record], products: dict[str, ProductAttrs]) -> set[str]:
    """Categories whose typical price the batch reads or changes (:func:`reads_prices`)."""
    cats: set[str | None] = set()
    for r in records:
        ev = r.event
        if not reads_prices(ev):
            continue
        if isinstance(ev, CatalogProduct):
            cats.add(catalog.category_of(ev))
            old = products.get(ev.product_id)
            cats.add(old.category if old else None)
        elif ev.product_id in products:  # type: ignore[union-attr]
            cats.add(products[ev.product_id].category)  # type: ignore[union-attr]
    cats.discard(None)
    return {c for c in cats if c is not None}


class _Planner:
    def __init__(self, view: View, cfg: FeatureSettings) -> None:
        self.view, self.cfg, self.plan = view, cfg, Plan()
        self.users = dict(view.users)
        self.products = dict(view.products)
        self.prices = dict(view.category_prices)
        self.seen: set[str] = set()

    def run(self, records: list[Record]) -> Plan:
        for i, r in enumerate(records):
            if self._is_redelivery(r):
                self.plan.skipped.append(i)
                continue
            m = marker(r.event)
            if m is not None and (m in self.view.applied or m in self.seen):
                self.plan.skipped.append(i)
                continue
            reason = self._apply(r.event)
            if reason is not None:
                self.plan.rejected.append((i, reason))
            elif m is not None:
                self.seen.add(m)
                self.plan.applied.append(m)
        return self.plan

    def _is_redelivery(self, r: Record) -> bool:
        if r.source is None:
            return False
        tp = (r.source.topic, r.source.partition)
        if r.source.offset <= self.view.offsets.get(tp, -1):
            return True
        self.plan.offsets[tp] = max(r.source.offset, self.plan.offsets.get(tp, -1))
        return False

    def _apply(self, ev: FeatureEvent) -> str | None:
        if isinstance(ev, CatalogProduct):
            self._product(ev)
        elif isinstance(ev, Query):
            stored = query_item.stored_text(ev.text, query_item.context_keys(ev.context))
            self.plan.queries.append((ev.query_id, stored))
            if self._tracks(ev.user_id, ev.timestamp.timestamp()):
                self._set_user(ev.user_id, user.on_query(self.users.get(ev.user_id), ev, self.cfg))
        elif isinstance(ev, RankedResult):
            self._impressions(ev)
        else:
            return self._interaction(ev)
        return None

    def _tracks(self, user_id: str, t: float) -> bool:
        """False for a forgotten shopper's events up to the moment they were forgotten."""
        forgotten_at = self.view.tombstones.get(user_id)
        return forgotten_at is None or t > forgotten_at

    def _set_user(self, user_id: str, state: UserState) -> None:
        self.users[user_id] = state
        self.plan.users[user_id] = state

    def _product(self, ev: CatalogProduct) -> None:
        old = self.products.get(ev.product_id)
        new = catalog.on_product(old, ev)
        if new is None:
            return
        self.products[ev.product_id] = new
        self.plan.products[ev.product_id] = new
        self.plan.product_docs[ev.product_id] = encode_event(ev)
        for cat, (dn, dc) in catalog.price_deltas(old, new).items():
            n0, c0 = self.prices.get(cat, (0, 0))
            self.prices[cat] = (n0 + dn, c0 + dc)
            pn, pc = self.plan.price_deltas.get(cat, (0, 0))
            self.plan.price_deltas[cat] = (pn + dn, pc + dc)

    def _impressions(self, ev: RankedResult) -> None:
        """Count the impressions of the products the catalog knows. A result naming others is
        not rejected (the impression is what the shopper saw, and the labeled list the joiner
        builds from it is kept): their ids go to ``Plan.unknown_impressions`` to be counted."""
        known, unknown = [], []
        for p in ev.products:
            (known if p.product_id in self.products else unknown).append(p.product_id)
        if unknown:
            self.plan.unknown_impressions.append((ev.query_id, unknown))
        if known:
            self.plan.impressions.append((ev.timestamp.timestamp(), known))

    def _interaction(self, ev: InteractionT) -> str | None:
        attrs = self.products.get(ev.product_id)
        if attrs is None:
            return f"unknown product_id {ev.product_id!r} - at `$.product_id`"
        t = ev.timestamp.timestamp()
        kind = KIND_OF[type(ev)]
        self.plan.items.append((ev.product_id, kind, t))
        if ev.query_id is not None:
            self.plan.query_items.append((ev.query_id, ev.product_id, kind, t))
        if self._tracks(ev.user_id, t):
            typical = None
            if attrs.category is not None and attrs.category in self.prices:
                typical = catalog.typical_price(*self.prices[attrs.category])
            state = user.on_interaction(self.users.get(ev.user_id), ev, attrs, typical, self.cfg)
            self._set_user(ev.user_id, state)
        return None


def plan(records: list[Record], view: View, cfg: FeatureSettings,
         batch_ends: dict[tuple[str, int], int] | None = None) -> Plan:
    """The writes ``records`` cause on top of ``view``, in record order. Pure.

    ``batch_ends``: the partition ends of the whole batch that ``records`` (one shard's share) come
    from. The shard records them as its offsets even where none of its own records reached them,
    so every shard holds the same offset per partition after a batch and a redelivery of any
    part of it is recognised everywhere (``view.offsets`` must hold the shard's offsets of them)."""
    p = _Planner(view, cfg).run(records)
    for tp, end in (batch_ends or {}).items():
        if end > max(view.offsets.get(tp, -1), p.offsets.get(tp, -1)):
            p.offsets[tp] = end
    return p
