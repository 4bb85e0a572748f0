"""The in-memory feature store: the trainer replays history through it in event-time order.

It commits a :class:`features.plan.Plan` exactly as the Redis commit script does, section by
section, so both stores hold bit-identical states after the same batches. With owner shards
(``FeatureSettings.shards``) it keeps one state per shard, as Redis keeps one hash tag per shard,
and merges the shared aggregates the same way when read. TTLs are not applied here (the shopper
TTL is applied in event time by the update rules and the read path anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from core.events import CatalogProduct
from core.settings import FeatureSettings
from features import catalog, item, query_item
from features.catalog import ProductAttrs
from features.keys import Shards
from features.plan import (
    FeatureEvent,
    Plan,
    Record,
    View,
    by_shard,
    categories_needed,
    ends,
    needs,
    phases,
    plan,
)
from features.speller import Speller
from features.store import OnRejected, Outcome, Rows, Snapshot, outcome
from features.user import UserState


@dataclass
class _Shard:
    """What one owner shard holds (one hash tag's keys in Redis)."""

    users: dict[str, UserState] = field(default_factory=dict)
    tombstones: dict[str, float] = field(default_factory=dict)
    products: dict[str, ProductAttrs] = field(default_factory=dict)
    product_docs: dict[str, bytes] = field(default_factory=dict)
    prices: dict[str, tuple[int, int]] = field(default_factory=dict)
    items: dict[str, tuple[float, ...]] = field(default_factory=dict)
    query_items: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)
    query_totals: dict[str, tuple[float, ...]] = field(default_factory=dict)
    query_texts: dict[str, str] = field(default_factory=dict)
    pending: dict[str, list[tuple[str, int, float]]] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


class MemoryStore:
    def __init__(self, config: FeatureSettings) -> None:
        self.config = config  # no default: training must replay with the rules the scorer reads with
        self.shards = Shards(config.shards)
        self._shards = [_Shard() for _ in range(self.shards.n)]
        self._speller = Speller(self.config.spelling_min_clicks)  # clicks per word, all shards

    def _of(self, owner_id: str) -> _Shard:
        return self._shards[self.shards.of(owner_id)]

    @property
    def product_docs(self) -> dict[str, bytes]:
        return {p: d for sh in self._shards for p, d in sh.product_docs.items()}

    def _prices(self) -> dict[str, tuple[int, int]]:
        """Category price sums over the shards (integers: exact in any order)."""
        if len(self._shards) == 1:
            return dict(self._shards[0].prices)
        out: dict[str, tuple[int, int]] = {}
        for sh in self._shards:
            for cat, (n, c) in sh.prices.items():
                n0, c0 = out.get(cat, (0, 0))
                out[cat] = (n0 + n, c0 + c)
        return out

    # --- writing ----------------------------------------------------------------------------

    def apply(self, event: FeatureEvent) -> Outcome:
        return self.apply_batch([Record(event)])

    def apply_batch(self, records: Sequence[Record], on_rejected: OnRejected | None = None) -> Outcome:
        batch = list(records)
        done: list[tuple[list[int], Plan]] = []
        for phase in phases(batch, self.shards):
            phase_ends = ends([batch[i] for i in phase])
            for shard, indices in by_shard(batch, phase, self.shards).items():
                part = [batch[i] for i in indices]
                p = plan(part, self._view(self._shards[shard], part, phase_ends), self.config, phase_ends)
                mine = [(indices[i], reason) for i, reason in p.rejected]
                if on_rejected is not None and mine:
                    on_rejected(mine)
                self._commit(self._shards[shard], p)
                done.append((indices, p))
        return outcome(done)

    def _view(self, sh: _Shard, records: list[Record], batch_ends: dict[tuple[str, int], int]) -> View:
        n = needs(records)
        products = {}
        for p in n.products:
            attrs = self._of(p).products.get(p)
            if attrs is not None:
                products[p] = attrs
        cats = categories_needed(records, products)
        prices = self._prices() if cats else {}
        return View(
            users={u: sh.users[u] for u in n.users if u in sh.users},
            tombstones={u: sh.tombstones[u] for u in n.users if u in sh.tombstones},
            products=products,
            category_prices={c: prices[c] for c in cats if c in prices},
            applied={m for m in n.markers if m in sh.applied},
            offsets={tp: sh.offsets[tp] for tp in {*n.partitions, *batch_ends} if tp in sh.offsets},
        )

    def _commit(self, sh: _Shard, p: Plan) -> None:
        sh.users.update(p.users)
        sh.products.update(p.products)
        sh.product_docs.update(p.product_docs)
        for cat, (dn, dc) in p.price_deltas.items():
            n0, c0 = sh.prices.get(cat, (0, 0))
            sh.prices[cat] = (n0 + dn, c0 + dc)
        h_item = self.config.item_half_life_s
        for pid, kind, t in p.items:
            sh.items[pid] = item.apply(sh.items.get(pid, item.EMPTY), kind, t, h_item)
        for t, pids in p.impressions:
            for pid in pids:
                sh.items[pid] = item.apply(sh.items.get(pid, item.EMPTY), item.IMPRESSION, t, h_item)
        for query_id, text in p.queries:
            sh.query_texts[query_id] = text
            for pid, kind, t in sh.pending.pop(query_id, []):
                self._query_item(sh, text, pid, kind, t)
        for query_id, pid, kind, t in p.query_items:
            text = sh.query_texts.get(query_id)
            if text is None:
                sh.pending.setdefault(query_id, []).append((pid, kind, t))
            else:
                self._query_item(sh, text, pid, kind, t)
        sh.applied.update(p.applied)
        sh.offsets.update(p.offsets)

    def _query_item(self, sh: _Shard, stored: str, pid: str, kind: int, t: float) -> None:
        h, hb = self.config.query_half_life_s, self.config.query_burst_half_life_s
        items, totals, empty = sh.query_items, sh.query_totals, query_item.EMPTY
        for text in query_item.evidence_keys(stored):
            items[text, pid] = query_item.apply(items.get((text, pid), empty), kind, t, h, hb)
            totals[text] = query_item.apply(totals.get(text, empty), kind, t, h, hb)
        if kind == query_item.CLICKS:
            for word in query_item.stored_words(stored):
                self._speller.add(word)

    def forget(self, user_id: str, at: float) -> None:
        sh = self._of(user_id)
        sh.tombstones[user_id] = max(at, sh.tombstones.get(user_id, at))
        sh.users.pop(user_id, None)

    # --- reading ----------------------------------------------------------------------------

    def snapshot(
        self, users: Iterable[str], products: Sequence[str], evidence: Mapping[str, Sequence[str]]
    ) -> Snapshot:
        pids = list(dict.fromkeys(products))
        evidence = dict(evidence)  # tests pass [] for none
        cfg, empty = self.config, query_item.EMPTY
        snap = Snapshot(
            users={u: st for u in set(users) if (st := self.user(u)) is not None},
            products={p: a for p in pids if (a := self._of(p).products.get(p)) is not None},
            category_prices=self._prices(),
        )
        snap.item_rows = Rows.merged([Rows.of(pids, [sh.items.get(p) for p in pids], item.EMPTY)
                                      for sh in self._shards],
                                     lambda st: item.merge(st, cfg.item_half_life_s))
        merge_q = lambda st: query_item.merge(st, cfg.query_half_life_s, cfg.query_burst_half_life_s)  # noqa: E731
        for t, ps in evidence.items():
            snap.evidence[t] = Rows.merged([Rows.of(ps, [sh.query_items.get((t, p)) for p in ps], empty)
                                            for sh in self._shards], merge_q)
            totals = [sh.query_totals.get(t) for sh in self._shards]
            if any(x is not None for x in totals):
                snap.query_totals[t] = tuple(Rows.merged([Rows.of([t], [x], empty) for x in totals],
                                                         merge_q).states[0].tolist())
        return snap

    def speller(self) -> Speller:
        return self._speller

    def user(self, user_id: str) -> UserState | None:
        return self._of(user_id).users.get(user_id)

    def users(self) -> dict[str, UserState]:
        return {u: st for sh in self._shards for u, st in sh.users.items()}

    def products(self, product_ids: Sequence[str]) -> dict[str, CatalogProduct]:
        return catalog.documents(product_ids, [self._of(p).product_docs.get(p) for p in product_ids])

    def item(self, product_id: str) -> tuple[float, ...]:
        rows = [Rows.of([product_id], [sh.items.get(product_id)], item.EMPTY) for sh in self._shards]
        merged = Rows.merged(rows, lambda st: item.merge(st, self.config.item_half_life_s))
        return tuple(merged.states[0].tolist()) if merged.present[0] else item.EMPTY
