"""The Redis feature store: read what a batch needs in one round trip, plan, commit with one script.

Shopper and product values carry an 8-byte etag prefix that the commit script checks (optimistic
concurrency: a conflicting batch is re-read and re-planned, which only happens when two workers
briefly share a partition during a rebalance, or when a query and a click of the same shopper are
processed at the same moment by two agents).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
import structlog

from core.settings import FeatureSettings, RedisSettings, StreamsSettings
from features import catalog, item, keys, query_item, user
from features.lua import COMMIT
from features.plan import FeatureEvent, Plan, Record, View, categories_needed, needs, plan
from features.store import Outcome, Snapshot
from features.user import UserState

log = structlog.get_logger(__name__)

ETAG = 8
MAX_ATTEMPTS = 50


def connect(settings: RedisSettings) -> redis.Redis:
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s, "health_check_interval": 30}
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.url.startswith("rediss://") and settings.tls_ca_certs:
        options["ssl_ca_certs"] = settings.tls_ca_certs
    return redis.Redis.from_url(settings.url, **options)


class ConflictError(RuntimeError):
    """A batch kept conflicting with other writers; nothing of it was written."""


class RedisStore:
    def __init__(
        self,
        client: redis.Redis,
        config: FeatureSettings | None = None,
        streams: StreamsSettings | None = None,
    ) -> None:
        self.client = client
        self.config = config or FeatureSettings()
        self.streams = streams or StreamsSettings()
        self._commit_script = client.register_script(COMMIT)
        self._etag_prefix = os.urandom(4)
        self._etag_counter = itertools.count()  # next() on it is atomic: agents share the store
        self.conflicts = 0

    # --- writing ----------------------------------------------------------------------------

    def _etag(self) -> bytes:
        return self._etag_prefix + (next(self._etag_counter) % 2**32).to_bytes(4, "big")

    def apply(self, event: FeatureEvent) -> Outcome:
        return self.apply_batch([Record(event)])

    def apply_batch(self, records: Sequence[Record]) -> Outcome:
        batch = list(records)
        for attempt in range(MAX_ATTEMPTS):
            view, guards = self._read(batch)
            p = plan(batch, view, self.config)
            failed = self._commit(p, guards)
            if failed is None:
                if p.duplicates:  # a metric only: redeliveries and replays that were skipped
                    self.client.hincrby(keys.STATS, "duplicates", p.duplicates)
                return Outcome(p.n_applied, p.duplicates, p.rejected)
            self.conflicts += 1
            log.info("batch_conflict", guard=failed, attempt=attempt, events=len(batch))
            time.sleep(min(0.2, 0.002 * 2**attempt))
        raise ConflictError(f"batch of {len(batch)} events conflicted {MAX_ATTEMPTS} times")

    def _read(self, records: list[Record]) -> tuple[View, list[tuple[str, str, bytes]]]:
        n = needs(records)
        users, products = sorted(n.users), sorted(n.products)
        markers, tps = sorted(n.markers), sorted(n.partitions)
        all_keys = (
            [keys.user(u) for u in users]
            + [keys.tombstone(u) for u in users]
            + [keys.product(p) for p in products]
            + markers
            + [keys.offset(t, p) for t, p in tps]
        )
        values = iter(self.client.mget(all_keys) if all_keys else [])
        view = View()
        guards: list[tuple[str, str, bytes]] = []
        for u in users:
            raw = next(values)
            guards.append((keys.user(u), "e", raw[:ETAG] if raw else b""))
            if raw:
                view.users[u] = user.decode(raw[ETAG:])
        for u in users:
            raw = next(values)
            guards.append((keys.tombstone(u), "v", raw or b""))
            if raw:
                view.tombstones[u] = float(raw)
        for p in products:
            raw = next(values)
            guards.append((keys.product(p), "e", raw[:ETAG] if raw else b""))
            if raw:
                view.products[p] = catalog.decode(raw[ETAG:])
        for m in markers:
            if next(values):
                view.applied.add(m)
            else:
                guards.append((m, "v", b""))
        for tp in tps:
            raw = next(values)
            guards.append((keys.offset(*tp), "v", raw or b""))
            if raw:
                view.offsets[tp] = int(raw)
        cats = sorted(categories_needed(records, view.products))
        if cats:
            fields = [f(c) for c in cats for f in (keys.price_count_field, keys.price_cents_field)]
            raw_prices = self.client.hmget(keys.CATEGORY_PRICES, fields)
            for i, c in enumerate(cats):
                n_raw, c_raw = raw_prices[2 * i], raw_prices[2 * i + 1]
                if n_raw is not None:
                    view.category_prices[c] = (int(n_raw), int(c_raw or 0))
        return view, guards

    def _commit(self, p: Plan, guards: list[tuple[str, str, bytes]]) -> int | None:
        # Only guards that matter: markers already applied are skipped by the plan, so only
        # absent ones are checked; everything read is checked (cheap: GETRANGE of 8 bytes).
        user_ttl = str(self.config.user_ttl_s * 1000)
        sets: list[tuple[str, bytes, str]] = []
        for u, st in p.users.items():
            sets.append((keys.user(u), self._etag() + user.encode(st), user_ttl))
        for pid, attrs in p.products.items():
            sets.append((keys.product(pid), self._etag() + catalog.encode(attrs), "0"))
        for pid, doc in p.product_docs.items():
            sets.append((keys.product_doc(pid), doc, "0"))
        hincr = []
        for cat, (dn, dc) in p.price_deltas.items():
            hincr.append((keys.CATEGORY_PRICES, keys.price_count_field(cat), str(dn)))
            hincr.append((keys.CATEGORY_PRICES, keys.price_cents_field(cat), str(dc)))
        if not (sets or hincr or p.items or p.queries or p.query_items or p.applied or p.offsets):
            return None
        s = self.streams
        args: list[str | bytes] = [
            repr(self.config.item_half_life_s),
            repr(self.config.query_half_life_s),
            str(self.config.query_item_ttl_s * 1000),
            str(s.query_text_ttl_s * 1000),
            str(s.dedup_ttl_s * 1000),
        ]
        args += [str(len(x)) for x in (guards, sets, hincr, p.items, p.queries, p.query_items,
                                       p.applied, p.offsets)]
        for g in guards:
            args.extend(g)
        for x in sets:
            args.extend(x)
        for x in hincr:
            args.extend(x)
        for pid, kind, t in p.items:
            args += [pid, str(kind), repr(t)]
        for qid, text in p.queries:
            args += [qid, text]
        for qid, pid, kind, t in p.query_items:
            args += [qid, pid, str(kind), repr(t)]
        args.extend(p.applied)
        for (topic, part), off in p.offsets.items():
            args += [keys.offset(topic, part), str(off)]
        result = self._commit_script(keys=[], args=args)
        if result == 0:
            return None
        return int(result[0])

    def forget(self, user_id: str, at: float) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(keys.tombstone(user_id), repr(at))
            pipe.delete(keys.user(user_id))
            pipe.execute()

    def clear(self) -> int:
        """Delete every feature key that ``rebuild`` recomputes; tombstones stay. Returns count."""
        deleted = 0
        for prefix in keys.REBUILT:
            batch: list[bytes] = []
            for k in self.client.scan_iter(match=prefix + "*", count=5000):
                batch.append(k)
                if len(batch) >= 5000:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
        deleted += self.client.unlink(keys.CATEGORY_PRICES, keys.STATS)
        return deleted

    # --- reading ----------------------------------------------------------------------------

    def snapshot(
        self, users: Iterable[str], products: Iterable[str], pairs: Iterable[tuple[str, str]]
    ) -> Snapshot:
        u_ids, p_ids, qi_pairs = sorted(set(users)), sorted(set(products)), sorted(set(pairs))
        texts = sorted({text for text, _ in qi_pairs})
        key_lists = [
            [keys.user(u) for u in u_ids],
            [keys.product(p) for p in p_ids],
            [keys.item(p) for p in p_ids],
            [keys.query_item(t, p) for t, p in qi_pairs],
            [keys.query_total(t) for t in texts],
        ]
        with self.client.pipeline(transaction=False) as pipe:
            for ks in key_lists:
                if ks:
                    pipe.mget(ks)
            pipe.hgetall(keys.CATEGORY_PRICES)
            replies = iter(pipe.execute())
        raw_users, raw_products, raw_items, raw_qi, raw_qc = (
            next(replies) if ks else [] for ks in key_lists
        )
        raw_prices = next(replies)
        snap = Snapshot()
        for u, raw in zip(u_ids, raw_users, strict=False):
            if raw:
                snap.users[u] = user.decode(raw[ETAG:])
        for p, raw in zip(p_ids, raw_products, strict=False):
            if raw:
                snap.products[p] = catalog.decode(raw[ETAG:])
        for p, raw in zip(p_ids, raw_items, strict=False):
            if raw:
                snap.items[p] = item.decode(raw)
        for pair, raw in zip(qi_pairs, raw_qi, strict=False):
            if raw:
                snap.query_items[pair] = query_item.decode(raw)
        for t, raw in zip(texts, raw_qc, strict=False):
            if raw:
                snap.query_totals[t] = query_item.decode(raw)
        snap.category_prices = _category_prices(raw_prices)
        return snap

    def user(self, user_id: str) -> UserState | None:
        raw = self.client.get(keys.user(user_id))
        return user.decode(raw[ETAG:]) if raw else None

    def users(self) -> dict[str, UserState]:
        out = {}
        for k in self.client.scan_iter(match=keys.USER + "*", count=5000):
            raw = self.client.get(k)
            if raw:
                out[k.decode()[len(keys.USER):]] = user.decode(raw[ETAG:])
        return out

    def item(self, product_id: str) -> tuple[float, ...]:
        return item.decode(self.client.get(keys.item(product_id)))

    def product(self, product_id: str) -> catalog.ProductAttrs | None:
        raw = self.client.get(keys.product(product_id))
        return catalog.decode(raw[ETAG:]) if raw else None


def _category_prices(raw: dict[bytes, bytes]) -> dict[str, tuple[int, int]]:
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    for f, v in raw.items():
        name = f.decode()
        if name.startswith("n:"):
            counts[name[2:]] = int(v)
        elif name.startswith("c:"):
            totals[name[2:]] = int(v)
    return {c: (n, totals.get(c, 0)) for c, n in counts.items()}
