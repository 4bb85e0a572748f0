"""The in-memory feature store: the trainer replays history through it in event-time order.

It commits a :class:`features.plan.Plan` exactly as the Redis commit script does, section by
section, so both stores hold bit-identical states after the same batches. TTLs are not applied
here (the shopper TTL is applied in event time by the update rules and the read path anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from core.events import CatalogProduct
from core.settings import FeatureSettings
from features import catalog, item, query_item
from features.catalog import ProductAttrs
from features.plan import FeatureEvent, Plan, Record, View, categories_needed, needs, plan
from features.speller import Speller
from features.store import OnRejected, Outcome, Rows, Snapshot
from features.user import UserState


class MemoryStore:
    def __init__(self, config: FeatureSettings) -> None:
        self.config = config  # no default: training must replay with the rules the scorer reads with
        self._users: dict[str, UserState] = {}
        self._tombstones: dict[str, float] = {}
        self._products: dict[str, ProductAttrs] = {}
        self.product_docs: dict[str, bytes] = {}
        self._prices: dict[str, tuple[int, int]] = {}
        self._items: dict[str, tuple[float, ...]] = {}
        self._query_items: dict[tuple[str, str], tuple[float, ...]] = {}
        self._query_totals: dict[str, tuple[float, ...]] = {}
        self._query_texts: dict[str, str] = {}
        self._speller = Speller(self.config.spelling_min_clicks)
        self._pending: dict[str, list[tuple[str, int, float]]] = {}
        self._applied: set[str] = set()
        self._offsets: dict[tuple[str, int], int] = {}

    # --- writing ----------------------------------------------------------------------------

    def apply(self, event: FeatureEvent) -> Outcome:
        return self.apply_batch([Record(event)])

    def apply_batch(self, records: Sequence[Record], on_rejected: OnRejected | None = None) -> Outcome:
        batch = list(records)
        p = plan(batch, self._view(batch), self.config)
        if on_rejected is not None and p.rejected:
            on_rejected(p.rejected)
        self._commit(p)
        return Outcome(p.n_applied, p.duplicates, p.rejected, p.skipped, p.unknown_impressions)

    def _view(self, records: list[Record]) -> View:
        n = needs(records)
        products = {p: self._products[p] for p in n.products if p in self._products}
        cats = categories_needed(records, products)
        return View(
            users={u: self._users[u] for u in n.users if u in self._users},
            tombstones={u: self._tombstones[u] for u in n.users if u in self._tombstones},
            products=products,
            category_prices={c: self._prices[c] for c in cats if c in self._prices},
            applied={m for m in n.markers if m in self._applied},
            offsets={tp: self._offsets[tp] for tp in n.partitions if tp in self._offsets},
        )

    def _commit(self, p: Plan) -> None:
        self._users.update(p.users)
        self._products.update(p.products)
        self.product_docs.update(p.product_docs)
        for cat, (dn, dc) in p.price_deltas.items():
            n0, c0 = self._prices.get(cat, (0, 0))
            self._prices[cat] = (n0 + dn, c0 + dc)
        h_item = self.config.item_half_life_s
        for pid, kind, t in p.items:
            self._items[pid] = item.apply(self._items.get(pid, item.EMPTY), kind, t, h_item)
        for t, pids in p.impressions:
            for pid in pids:
                self._items[pid] = item.apply(self._items.get(pid, item.EMPTY), item.IMPRESSION, t, h_item)
        for query_id, text in p.queries:
            self._query_texts[query_id] = text
            for pid, kind, t in self._pending.pop(query_id, []):
                self._query_item(text, pid, kind, t)
        for query_id, pid, kind, t in p.query_items:
            text = self._query_texts.get(query_id)
            if text is None:
                self._pending.setdefault(query_id, []).append((pid, kind, t))
            else:
                self._query_item(text, pid, kind, t)
        self._applied.update(p.applied)
        self._offsets.update(p.offsets)

    def _query_item(self, stored: str, pid: str, kind: int, t: float) -> None:
        h, hb = self.config.query_half_life_s, self.config.query_burst_half_life_s
        items, totals, empty = self._query_items, self._query_totals, query_item.EMPTY
        for text in query_item.evidence_keys(stored):
            items[text, pid] = query_item.apply(items.get((text, pid), empty), kind, t, h, hb)
            totals[text] = query_item.apply(totals.get(text, empty), kind, t, h, hb)
        if kind == query_item.CLICKS:
            for word in query_item.stored_words(stored):
                self._speller.add(word)

    def forget(self, user_id: str, at: float) -> None:
        self._tombstones[user_id] = max(at, self._tombstones.get(user_id, at))
        self._users.pop(user_id, None)

    # --- reading ----------------------------------------------------------------------------

    def snapshot(
        self, users: Iterable[str], products: Sequence[str], evidence: Mapping[str, Sequence[str]]
    ) -> Snapshot:
        pids = list(dict.fromkeys(products))
        qi, empty = self._query_items, query_item.EMPTY
        evidence = dict(evidence)  # tests pass [] for none
        return Snapshot(
            users={u: self._users[u] for u in set(users) if u in self._users},
            products={p: self._products[p] for p in pids if p in self._products},
            item_rows=Rows.of(pids, [self._items.get(p) for p in pids], item.EMPTY),
            evidence={t: Rows.of(ps, [qi.get((t, p)) for p in ps], empty) for t, ps in evidence.items()},
            query_totals={t: self._query_totals[t] for t in evidence if t in self._query_totals},
            category_prices=dict(self._prices),
        )

    def speller(self) -> Speller:
        return self._speller

    def user(self, user_id: str) -> UserState | None:
        return self._users.get(user_id)

    def users(self) -> dict[str, UserState]:
        return dict(self._users)

    def products(self, product_ids: Sequence[str]) -> dict[str, CatalogProduct]:
        return catalog.documents(product_ids, [self.product_docs.get(p) for p in product_ids])

    def item(self, product_id: str) -> tuple[float, ...]:
        return self._items.get(product_id, item.EMPTY)
