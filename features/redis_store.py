"""The Redis feature store: read what a batch needs in one round trip, plan, commit with one script.

Shopper and product values carry a 12-byte etag prefix that the commit script checks (optimistic
concurrency: a conflicting batch is re-read and re-planned, which only happens when two workers
briefly share a partition during a rebalance, or when a query and a click of the same shopper are
processed at the same moment by two agents).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis
import structlog
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

from core.events import CatalogProduct, Purchase
from core.settings import FeatureSettings, RedisSettings, StreamsSettings
from features import catalog, item, keys, lua, query_item, user
from features.plan import FeatureEvent, Plan, Record, View, needs, plan
from features.sentinel import sentinel_client
from features.speller import Speller
from features.store import OnRejected, Outcome, Rows, Snapshot
from features.user import UserState

log = structlog.get_logger(__name__)

ETAG = lua.ETAG
MAX_ATTEMPTS = 50
# A query's evidence hash is read whole when it holds at most this many products (it most often
# holds fewer than the candidates asked); larger ones, for the candidates only.
WHOLE_HASH_MAX = 1000
MAX_LARGE_HASHES = 100_000  # texts remembered as large; past that, the rest are read whole
_TOTAL_FIELD = keys.QUERY_TOTAL_FIELD.encode()
# A conflicting batch (another writer, optimistic concurrency: not a connection error, so not the
# client's Retry) is re-read and re-planned after 2 ms, 4 ms, ... up to 0.2 s.
_CONFLICT_BACKOFF = ExponentialBackoff(cap=0.2, base=0.001)


def connect(settings: RedisSettings, replica: bool = False) -> redis.Redis:
    """A client whose commands retry connection errors and timeouts (``settings.retries``), with
    jitter, so that workers and scorers coming back after an outage do not retry in step. With
    ``settings.sentinels``, of the primary the Sentinels name (``replica``: of a replica)."""
    retry = Retry(ExponentialWithJitterBackoff(cap=settings.retry_cap_s, base=settings.retry_base_s),
                  settings.retries)
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s, "health_check_interval": 30,
                               "retry": retry}
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.url.startswith("rediss://") and settings.tls_ca_certs:
        options["ssl_ca_certs"] = settings.tls_ca_certs
    if settings.sentinels:
        return sentinel_client(settings, options, replica)
    return redis.Redis.from_url(settings.url, **options)


class ConflictError(RuntimeError):
    """A batch kept conflicting with other writers; nothing of it was written."""


class StateBehind(RuntimeError):
    """Redis holds less of a partition than this writer had committed: a failover promoted a
    replica that lacked the last acknowledged writes. Nothing of the batch was written; ``offsets``
    holds what Redis has (-1: nothing), from where the writer must replay."""

    def __init__(self, offsets: dict[tuple[str, int], int]) -> None:
        super().__init__(f"Redis is behind this writer on {sorted(offsets)}")
        self.offsets = offsets


class RedisStore:
    def __init__(
        self,
        client: redis.Redis,
        config: FeatureSettings,
        streams: StreamsSettings | None = None,
    ) -> None:
        self.client = client
        self.config = config  # no default: the scorer and the trainer must read with the same rules
        self.streams = streams or StreamsSettings()
        self._commit_script = client.register_script(lua.COMMIT)
        # Query texts whose evidence hash is too large to read whole (see ``snapshot``); a set:
        # the scorer reads on two threads, and adding to a set is atomic.
        self._large_hashes: set[str] = set()
        self._etag_prefix = os.urandom(3).hex().encode()
        self._etag_counter = itertools.count()  # next() on it is atomic: agents share the store
        self.conflicts = 0
        self._speller: Speller | None = None
        self._speller_loaded = 0.0

    # --- writing ----------------------------------------------------------------------------

    def _etag(self) -> bytes:
        """12 printable bytes: 6 hex digits of this process, 6 of a counter (16M writes a cycle)."""
        return self._etag_prefix + b"%06x" % (next(self._etag_counter) % 2**24)

    def apply(self, event: FeatureEvent) -> Outcome:
        return self.apply_batch([Record(event)])

    def apply_batch(self, records: Sequence[Record], on_rejected: OnRejected | None = None,
                    floors: dict[tuple[str, int], int] | None = None) -> Outcome:
        """``floors``: the offset per partition that Redis must hold at least (what the caller
        committed before); else :class:`StateBehind`. The offsets read are the commit's guards."""
        batch = list(records)
        reported: set[int] = set()
        for attempt in range(MAX_ATTEMPTS):
            view, guards = self._read(batch)
            if floors:  # the partitions this batch read (the others are checked with theirs)
                read = {(r.source.topic, r.source.partition) for r in batch if r.source is not None}
                behind = {tp: view.offsets.get(tp, -1) for tp in read
                          if view.offsets.get(tp, -1) < floors.get(tp, -1)}
                if behind:
                    raise StateBehind(behind)
            p = plan(batch, view, self.config)
            fresh = [r for r in p.rejected if r[0] not in reported]
            if on_rejected is not None and fresh:
                on_rejected(fresh)
                reported.update(i for i, _ in fresh)
            failed = self._commit(p, guards)
            if failed is None:
                return Outcome(p.n_applied, p.duplicates, p.rejected, p.skipped, p.unknown_impressions)
            self.conflicts += 1
            log.info("batch_conflict", guard=failed, attempt=attempt, events=len(batch))
            time.sleep(_CONFLICT_BACKOFF.compute(attempt + 1))
        raise ConflictError(f"batch of {len(batch)} events conflicted {MAX_ATTEMPTS} times")

    def _read(self, records: list[Record]) -> tuple[View, list[tuple[str, str, bytes]]]:
        n = needs(records)
        view = View()
        users, products = sorted(n.users), sorted(n.products)
        markers, tps = sorted(n.markers), sorted(n.partitions)
        all_keys = (
            [keys.user(u) for u in users]
            + [keys.tombstone(u) for u in users]
            + [keys.product(p) for p in products]
            + [keys.offset(t, p) for t, p in tps]
        )
        bucket = self._bucket(self.streams.dedup_ttl_s)
        # Category prices are few: read them all in the same round trip when the batch may need them.
        prices = any(isinstance(r.event, Purchase | CatalogProduct) for r in records)
        with self.client.pipeline(transaction=False) as pipe:
            if all_keys:
                pipe.mget(all_keys)
            if markers:
                pipe.hmget(keys.applied_bucket(bucket), markers)
                pipe.hmget(keys.applied_bucket(bucket - 1), markers)
            if prices:
                pipe.hgetall(keys.CATEGORY_PRICES)
            replies = iter(pipe.execute() if all_keys or markers or prices else [])
        values = iter(next(replies) if all_keys else [])
        if markers:
            now, before = next(replies), next(replies)
            view.applied.update(m for m, a, b in zip(markers, now, before, strict=True) if a or b)
        if prices:
            view.category_prices = _category_prices(next(replies))
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
        for tp in tps:
            raw = next(values)
            guards.append((keys.offset(*tp), "v", raw or b""))
            if raw:
                view.offsets[tp] = int(raw)
        return view, guards

    @staticmethod
    def _bucket(ttl_s: int) -> int:
        """Time bucket (wall clock) of markers and query texts: kept for this bucket and the next."""
        return int(time.time() // ttl_s)

    def _commit(self, p: Plan, guards: list[tuple[str, str, bytes]]) -> int | None:
        """Run the commit script (:mod:`features.lua`); the index of the failed guard, or None."""
        users = [(keys.user(u), self._etag() + user.encode(st)) for u, st in p.users.items()]
        products = [(keys.product(pid), self._etag() + catalog.encode(a)) for pid, a in p.products.items()]
        docs = [(keys.product_doc(pid), doc) for pid, doc in p.product_docs.items()]
        fields = []
        for cat, (dn, dc) in p.price_deltas.items():
            fields += [(keys.price_count_field(cat), str(dn)), (keys.price_cents_field(cat), str(dc))]
        if not (users or products or fields or p.items or p.impressions or p.queries or p.query_items
                or p.applied or p.offsets):
            if p.duplicates:  # a metric only: redeliveries and replays that were skipped
                self.client.hincrby(keys.STATS, keys.STATS_DUPLICATES, p.duplicates)
            return None
        s, cfg = self.streams, self.config
        marker_bucket = self._bucket(s.dedup_ttl_s)
        text_bucket = self._bucket(s.query_text_ttl_s)
        args: list[str | bytes] = [
            repr(cfg.item_half_life_s),
            repr(cfg.query_half_life_s),
            str(cfg.query_item_ttl_s * 1000),
            str(cfg.user_ttl_s * 1000),
            keys.applied_bucket(marker_bucket),
            str((marker_bucket + 2) * s.dedup_ttl_s),
            keys.query_texts(text_bucket),
            keys.query_texts(text_bucket - 1),
            str((text_bucket + 2) * s.query_text_ttl_s),
            str(s.query_text_ttl_s * 1000),
            b"".join([b"%s\t%s\t%s\n" % (k.encode(), m.encode(), e) for k, m, e in guards]),
            "".join([f"{pid}\t{kind}\t{t!r}\n" for pid, kind, t in p.items]),
            "".join([f"{qid}\t{text}\n" for qid, text in p.queries]),
            "".join([f"{qid}\t{pid}\t{kind}\t{t!r}\n" for qid, pid, kind, t in p.query_items]),
            "".join([f"{m}\n" for m in p.applied]),
            "".join([f"{keys.offset(topic, part)}\t{off}\n" for (topic, part), off in p.offsets.items()]),
            "".join([f"{t!r}\t{' '.join(pids)}\n" for t, pids in p.impressions]),
            str(len(users)),
            str(len(products)),
            str(len(docs)),
            str(len(fields)),
            str(p.duplicates),
            repr(cfg.query_burst_half_life_s),
        ]
        for pairs in (users, products, docs, fields):
            for k, v in pairs:
                args += [k, v]
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
        deleted += self.client.unlink(keys.CATEGORY_PRICES, keys.QUERY_WORDS, keys.STATS)
        return deleted

    # --- reading ----------------------------------------------------------------------------

    def snapshot(
        self, users: Iterable[str], products: Sequence[str], evidence: Mapping[str, Sequence[str]]
    ) -> Snapshot:
        """One pipeline: the shoppers, the products' attributes and statistics (MGET), each query
        text's evidence hash whole (HGETALL: it holds only the products the query led to, most
        often fewer than the candidates; a hash found larger than :data:`WHOLE_HASH_MAX` is read
        for the candidates only, HMGET, from then on), the category prices."""
        u_ids, p_ids = list(set(users)), list(dict.fromkeys(products))
        evidence = dict(evidence)  # tests pass [] for none
        large = self._large_hashes
        with self.client.pipeline(transaction=False) as pipe:
            if u_ids:
                pipe.mget([keys.user(u) for u in u_ids])
            if p_ids:
                pipe.mget([keys.product(p) for p in p_ids] + [keys.item(p) for p in p_ids])
            for text, pids in evidence.items():
                if text in large:
                    pipe.hmget(keys.query_evidence(text), [keys.QUERY_TOTAL_FIELD, *pids])
                else:
                    pipe.hgetall(keys.query_evidence(text))
            pipe.hgetall(keys.CATEGORY_PRICES)
            replies = iter(pipe.execute())
        raw_users = next(replies) if u_ids else []
        raw_products = next(replies) if p_ids else []
        snap = Snapshot()
        for u, raw in zip(u_ids, raw_users, strict=True):
            if raw:
                snap.users[u] = user.decode(raw[ETAG:])
        for p, raw in zip(p_ids, raw_products, strict=False):  # then the items
            if raw:
                snap.products[p] = catalog.decode(raw[ETAG:])
        snap.item_rows = _rows(p_ids, raw_products[len(p_ids):], item.SIZE)
        for text, pids in evidence.items():
            reply = next(replies)
            if isinstance(reply, dict):  # the whole hash
                if len(reply) > WHOLE_HASH_MAX and len(large) < MAX_LARGE_HASHES:
                    large.add(text)
                found = [reply.get(p.encode()) for p in pids]
                totals = reply.get(_TOTAL_FIELD)
            else:
                totals, found = reply[0], reply[1:]
            if totals is not None:
                snap.query_totals[text] = query_item.decode(totals)
            snap.evidence[text] = _rows(pids, found, query_item.SIZE)
        snap.category_prices = _category_prices(next(replies))
        return snap

    def speller(self) -> Speller:
        """The trusted query words (at least ``spelling_min_clicks`` clicks), reloaded when older
        than ``spelling_refresh_s``: one ZRANGEBYSCORE a minute, not one per query."""
        cfg, now = self.config, time.monotonic()
        if self._speller is None or now - self._speller_loaded >= cfg.spelling_refresh_s:
            rows = []
            if cfg.spelling_min_clicks > 0:
                rows = self.client.zrangebyscore(keys.QUERY_WORDS, cfg.spelling_min_clicks, "+inf",
                                                 withscores=True)
            self._speller = Speller.of({w.decode(): int(n) for w, n in rows}, cfg.spelling_min_clicks)
            self._speller_loaded = now
        return self._speller

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

    def products(self, product_ids: Sequence[str]) -> dict[str, CatalogProduct]:
        ids = list(product_ids)
        return catalog.documents(ids, self.client.mget([keys.product_doc(p) for p in ids]) if ids else [])

    def item(self, product_id: str) -> tuple[float, ...]:
        return item.decode(self.client.get(keys.item(product_id)))


def _rows(ids: Sequence[str], raw: Sequence[bytes | None], size: int) -> Rows:
    """Fixed-layout values as :class:`Rows`, decoded with one numpy call; a value of an older,
    shorter layout (fewer doubles) reads its missing ones as zeros, as one-by-one decoding did."""
    width, zero = 8 * size, bytes(8 * size)
    blob = b"".join([zero if v is None else (v if len(v) == width else (v + zero)[:width]) for v in raw])
    states = np.frombuffer(blob, "<f8").reshape(len(ids), size)
    return Rows(ids, states, np.array([v is not None for v in raw], dtype=bool))


def _category_prices(raw: dict[bytes, bytes]) -> dict[str, tuple[int, int]]:
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    for f, v in raw.items():
        if (field := keys.price_field(f.decode())) is not None:
            kind, category = field
            (counts if kind == keys.PRICE_COUNT else totals)[category] = int(v)
    return {c: (n, totals.get(c, 0)) for c, n in counts.items()}
