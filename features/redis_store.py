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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis
import structlog
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.cluster import LoadBalancingStrategy, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from core.events import CatalogProduct
from core.settings import FeatureSettings, RedisSettings, StreamsSettings
from features import catalog, item, keys, lua, query_item, resp, user
from features.catalog import ProductAttrs
from features.catalog_cache import CatalogCache, Lookup
from features.keys import Shards
from features.plan import FeatureEvent, Plan, Record, View, by_shard, ends, needs, phases, plan, reads_prices
from features.sentinel import sentinel_client
from features.speller import Speller
from features.store import OnRejected, Outcome, Rows, Snapshot, outcome
from features.user import UserState

log = structlog.get_logger(__name__)

ETAG = lua.ETAG
MAX_ATTEMPTS = 50
# A read or commit meeting a moved slot or a failing node is sent again after refreshing the
# cluster's slot map: 2 ms, 4 ms, ... up to 1 s apart, about 15 s in all (a failover: the node
# timeout, 5 s on make up-redis-cluster, then the replicas' election).
_ROUTE_ATTEMPTS = 20
_ROUTE_BACKOFF = ExponentialBackoff(cap=1.0, base=0.001)
# A query's evidence hash is read whole when it holds at most this many products (it most often
# holds fewer than the candidates asked); larger ones, for the candidates only.
WHOLE_HASH_MAX = 1000
MAX_LARGE_HASHES = 100_000  # texts remembered as large; past that, the rest are read whole
ATTRS_MEMO_MAX = 200_000  # decoded attributes kept (the bytes memo; the catalog cache, over its shards)
_TOTAL_FIELD = keys.QUERY_TOTAL_FIELD.encode()
# A conflicting batch (another writer, optimistic concurrency: not a connection error, so not the
# client's Retry) is re-read and re-planned after 2 ms, 4 ms, ... up to 0.2 s.
_CONFLICT_BACKOFF = ExponentialBackoff(cap=0.2, base=0.001)


Client = redis.Redis | RedisCluster


def connect(settings: RedisSettings, replica: bool = False) -> Client:
    """A client whose commands retry connection errors and timeouts (``settings.retries``), with
    jitter, so that workers and scorers coming back after an outage do not retry in step. With
    ``settings.sentinels``, of the primary the Sentinels name (``replica``: of a replica)."""
    retry = Retry(ExponentialWithJitterBackoff(cap=settings.retry_cap_s, base=settings.retry_base_s),
                  settings.retries)
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s, "health_check_interval": 30,
                               "retry": retry, "command_packer": resp.PACKER}
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.url.startswith("rediss://") and settings.tls_ca_certs:
        options["ssl_ca_certs"] = settings.tls_ca_certs
    if settings.sentinels:
        return sentinel_client(settings, options, replica)
    if settings.cluster:  # any node's URL; the client learns the slots and follows their moves
        # RedisCluster passes neither on to its nodes' connections (they keep redis-py's packer).
        options.pop("health_check_interval")
        options.pop("command_packer")
        if replica:
            options["load_balancing_strategy"] = LoadBalancingStrategy.RANDOM_REPLICA
        return RedisCluster.from_url(settings.url, **options)
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


_MOVED = (MovedError, AskError, TryAgainError, ClusterDownError)


class ShardPipes:
    """Commands addressed to owner shards, sent as one plain pipeline per Redis node (one round
    trip each). On a cluster each shard's slot is looked up once in the client's slot map;
    redis-py's cluster pipeline would hash every key of every MGET to check its slot (most of a
    feature read's CPU). After a slot moved or a node failed, the caller refreshes the map and
    sends again (:meth:`RedisStore._routed`)."""

    def __init__(self, client: Client, slots: list[int]) -> None:
        self.client, self.slots = client, slots
        self._pipes: dict[str, redis.client.Pipeline] = {}
        self._order: list[str] = []

    def to(self, shard: int) -> redis.client.Pipeline:
        name, conn = _node(self.client, self.slots[shard])
        pipe = self._pipes.get(name)
        if pipe is None:
            pipe = self._pipes[name] = conn.pipeline(transaction=False)
        self._order.append(name)
        return pipe

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The replies in the order the commands were addressed."""
        replies = {name: iter(pipe.execute(raise_on_error=raise_on_error))
                   for name, pipe in self._pipes.items()}
        return [next(replies[name]) for name in self._order]


def _node(client: Client, slot: int) -> tuple[str, redis.Redis]:
    """The node serving ``slot`` (its name, its client) in the client's slot map; one Redis: itself."""
    if isinstance(client, RedisCluster):
        node = client.nodes_manager.get_node_from_slot(
            slot, load_balancing_strategy=client.load_balancing_strategy)
        return node.name, node.redis_connection
    return "", client


class _ReadCommands:
    """The read commands :class:`ShardReads` sends, queued as their arguments."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool
        self.commands: list[tuple[Any, ...]] = []

    def mget(self, names: Sequence[str]) -> None:
        self.commands.append(("MGET", *names))

    def hmget(self, name: str, fields: Sequence[str]) -> None:
        self.commands.append(("HMGET", name, *fields))

    def hgetall(self, name: str) -> None:
        """Its reply is a dict (a RESP3 map as it comes; RESP2's flat list made one)."""
        self.commands.append(("HGETALL", name))


class ShardReads:
    """Read commands (MGET, HMGET, HGETALL) addressed to owner shards as :class:`ShardPipes`
    addresses them, sent on a pooled connection itself: one write per node, the replies read as
    they come, with no response callbacks (HGETALL's reply made a dict). redis-py's pipeline
    spent ~0.1 ms of CPU a feature read on its own bookkeeping around the same round trip
    (docs/scorer-cost.md). Connection errors and timeouts are retried on a new connection as the
    client's own commands are (its Retry); an error reply is raised once every reply is read, so
    the connection stays in step."""

    def __init__(self, client: Client, slots: list[int]) -> None:
        self.client, self.slots = client, slots
        self._nodes: dict[str, _ReadCommands] = {}
        self._order: list[str] = []

    def to(self, shard: int) -> _ReadCommands:
        name, conn = _node(self.client, self.slots[shard])
        queued = self._nodes.get(name)
        if queued is None:
            queued = self._nodes[name] = _ReadCommands(conn.connection_pool)
        self._order.append(name)
        return queued

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The replies in the order the commands were addressed (errors always raise)."""
        replies = {name: iter(_round_trip(queued.pool, queued.commands))
                   for name, queued in self._nodes.items()}
        return [next(replies[name]) for name in self._order]


def _round_trip(pool: redis.ConnectionPool, commands: list[tuple[Any, ...]]) -> list[Any]:
    conn = pool.get_connection()
    try:
        def send() -> list[Any]:
            conn.send_packed_command(conn.pack_commands(commands))
            replies, error = [], None
            for command in commands:
                try:
                    reply = conn.read_response()
                except redis.ResponseError as exc:  # in-band: the other replies are still to read
                    error = error or exc
                    continue
                if command[0] == "HGETALL" and isinstance(reply, list):  # RESP2: [field, value, ...]
                    fields = iter(reply)
                    reply = dict(zip(fields, fields, strict=True))
                replies.append(reply)
            if error is not None:
                raise error
            return replies

        return conn.retry.call_with_retry(send, lambda _error: conn.disconnect())
    finally:
        pool.release(conn)


class RedisStore:
    def __init__(
        self,
        client: Client,
        config: FeatureSettings,
        streams: StreamsSettings | None = None,
    ) -> None:
        self.client = client
        self.config = config  # no default: the scorer and the trainer must read with the same rules
        self.streams = streams or StreamsSettings()
        self.shards = Shards(config.shards)
        self.cluster = isinstance(client, RedisCluster)
        if self.cluster and self.shards.n < 2:
            raise ValueError("a Redis Cluster holds the feature state in owner shards: set "
                             "SHOPRANK_FEATURES_SHARDS to 2 or more (a few per primary)")
        self._commit_sha = lua.SHA  # loaded on first use (see _run_scripts)
        self._slots = [key_slot(keys.stats(t).encode()) for t in self.shards.tags]
        # Query texts whose evidence hash is too large to read whole (see ``snapshot``); a set:
        # the scorer reads on two threads, and adding to a set is atomic.
        self._large_hashes: set[str] = set()
        # Decoded product attributes by their stored bytes: the catalog changes rarely, so the
        # bytes read repeat (frozen values, shared safely; two threads racing decode the same).
        self._attrs: dict[bytes, ProductAttrs] = {}
        self._catalog = CatalogCache(self.shards.n, ATTRS_MEMO_MAX)
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
        committed before); else :class:`StateBehind`. The offsets read are the commit's guards.

        With owner shards the batch commits one script per shard (pipelined: one round trip per
        node); a shard whose guards fail is re-read and re-planned alone."""
        batch = list(records)
        done: list[tuple[list[int], Plan]] = []
        reported: set[int] = set()
        for phase in phases(batch, self.shards):
            done += self._apply_phase(batch, phase, on_rejected, floors, reported)
        return outcome(done)

    def _apply_phase(self, batch: list[Record], phase: list[int], on_rejected: OnRejected | None,
                     floors: dict[tuple[str, int], int] | None, reported: set[int]
                     ) -> list[tuple[list[int], Plan]]:
        phase_ends = ends([batch[i] for i in phase])
        waiting = by_shard(batch, phase, self.shards)
        done: list[tuple[list[int], Plan]] = []
        for attempt in range(MAX_ATTEMPTS):
            reads = self._read({s: [batch[i] for i in idx] for s, idx in waiting.items()}, phase_ends)
            if floors:
                behind: dict[tuple[str, int], int] = {}
                for view, _ in reads.values():
                    for tp in phase_ends:
                        if view.offsets.get(tp, -1) < floors.get(tp, -1):
                            behind[tp] = min(behind.get(tp, floors[tp]), view.offsets.get(tp, -1))
                if behind:
                    raise StateBehind(behind)
            plans = {s: plan([batch[i] for i in waiting[s]], view, self.config, phase_ends)
                     for s, (view, _) in reads.items()}
            fresh = [(waiting[s][i], why) for s, p in plans.items() for i, why in p.rejected
                     if waiting[s][i] not in reported]
            if on_rejected is not None and fresh:
                on_rejected(fresh)
                reported.update(i for i, _ in fresh)
            failed = self._commit({s: (p, reads[s][1]) for s, p in plans.items()})
            for s, p in plans.items():
                if s not in failed:
                    done.append((waiting.pop(s), p))
            if not waiting:
                return done
            self.conflicts += 1
            log.info("batch_conflict", shards=failed, attempt=attempt, events=len(phase))
            time.sleep(_CONFLICT_BACKOFF.compute(attempt + 1))
        raise ConflictError(f"batch of {len(phase)} events conflicted {MAX_ATTEMPTS} times")

    def _read(self, shards: dict[int, list[Record]], batch_ends: dict[tuple[str, int], int]
              ) -> dict[int, tuple[View, list[tuple[str, str, bytes]]]]:
        """Each shard's view of what its records need, and the guards of its commit, in one
        pipeline: its shoppers, tombstones and offsets (one MGET per shard), the products the
        records name (one MGET per products' shard), markers, category prices when needed."""
        tags, of = self.shards.tags, self.shards.of
        bucket = self._bucket(self.streams.dedup_ttl_s)
        wanted = {s: needs(records) for s, records in shards.items()}
        products = sorted({p for n in wanted.values() for p in n.products})
        products_by_shard: dict[int, list[str]] = {}
        for p in products:
            products_by_shard.setdefault(of(p), []).append(p)
        # Category prices are few: read them all in the same round trip when the batch may need them.
        prices = any(reads_prices(r.event) for rs in shards.values() for r in rs)
        plans: dict[int, tuple[list[str], list[str], list[tuple[str, int]]]] = {}
        for s, n in wanted.items():
            plans[s] = (sorted(n.users), sorted(n.markers), sorted(n.partitions | batch_ends.keys()))

        def issue(pipes: ShardReads) -> None:
            for s, (users, markers, tps) in plans.items():
                t = tags[s]
                names = ([keys.user(u, t) for u in users] + [keys.tombstone(u, t) for u in users]
                         + [keys.offset(tp, part, t) for tp, part in tps])
                if names:
                    pipes.to(s).mget(names)
                if markers:
                    pipes.to(s).hmget(keys.applied_bucket(bucket, t), markers)
                    pipes.to(s).hmget(keys.applied_bucket(bucket - 1, t), markers)
            for s, pids in products_by_shard.items():
                pipes.to(s).mget([keys.product(p, tags[s]) for p in pids])
            if prices:
                for s, t in enumerate(tags):
                    pipes.to(s).hgetall(keys.category_prices(t))

        replies = iter(self._routed(issue, via=ShardReads))
        out: dict[int, tuple[View, list[tuple[str, str, bytes]]]] = {}
        for s, (users, markers, tps) in plans.items():
            t, view, guards = tags[s], View(), []
            values = iter(next(replies) if users or tps else [])
            if markers:
                now, before = next(replies), next(replies)
                view.applied.update(m for m, a, b in zip(markers, now, before, strict=True) if a or b)
            for u in users:
                raw = next(values)
                guards.append((keys.user(u, t), "e", raw[:ETAG] if raw else b""))
                if raw:
                    view.users[u] = user.decode(raw[ETAG:])
            for u in users:
                raw = next(values)
                guards.append((keys.tombstone(u, t), "v", raw or b""))
                if raw:
                    view.tombstones[u] = float(raw)
            for tp in tps:
                raw = next(values)
                guards.append((keys.offset(*tp, t), "v", raw or b""))
                if raw:
                    view.offsets[tp] = int(raw)
            out[s] = (view, guards)
        attrs: dict[str, bytes | None] = {}
        for pids in products_by_shard.values():
            attrs.update(zip(pids, next(replies), strict=True))
        category_prices = _category_prices([_shard_prices(next(replies)) for _ in tags]) if prices else {}
        for s, (view, guards) in out.items():
            view.category_prices = category_prices
            for p in sorted(wanted[s].products):
                raw = attrs[p]
                if of(p) == s:  # the shard's own products (catalog updates): guarded by their etag
                    guards.append((keys.product(p, tags[s]), "e", raw[:ETAG] if raw else b""))
                if raw:
                    view.products[p] = catalog.decode(raw[ETAG:])
        return out

    @staticmethod
    def _bucket(ttl_s: int) -> int:
        """Time bucket (wall clock) of markers and query texts: kept for this bucket and the next."""
        return int(time.time() // ttl_s)

    def _routed(self, issue: Callable[[Any], None], raise_on_error: bool = True,
                via: type[ShardPipes] | type[ShardReads] = ShardPipes) -> list[Any]:
        """Send what ``issue`` addresses to the shards (:class:`ShardPipes`, or :class:`ShardReads`
        for plain reads); on a cluster whose slots moved or whose node failed over, refresh the
        slot map and send again (reads, and scripts whose guards make a repeat harmless)."""
        for attempt in range(_ROUTE_ATTEMPTS):
            pipes = via(self.client, self._slots)
            issue(pipes)
            try:
                return pipes.execute(raise_on_error)
            except (*_MOVED, redis.ConnectionError, redis.TimeoutError) as exc:
                if not self.cluster or attempt == _ROUTE_ATTEMPTS - 1:
                    raise
                log.warning("cluster_slots_refreshed", reason=type(exc).__name__, attempt=attempt)
                time.sleep(_ROUTE_BACKOFF.compute(attempt + 1))
                try:
                    self.client.nodes_manager.initialize()
                except (RedisClusterException, redis.RedisError) as failed:  # no node answers yet
                    log.info("cluster_slots_unknown", reason=repr(failed))
        raise AssertionError("unreachable")

    def _commit(self, plans: dict[int, tuple[Plan, list[tuple[str, str, bytes]]]]) -> list[int]:
        """Run the commit script (:mod:`features.lua`) for each shard's plan, in one pipeline;
        the shards whose guards failed (nothing of theirs was written)."""
        calls = {s: args for s, (p, guards) in plans.items() if (args := self._script_args(s, p, guards))}
        duplicates = sum(p.duplicates for s, (p, _) in plans.items() if s not in calls)
        if duplicates:  # a metric only: redeliveries and replays that were skipped
            self.client.hincrby(keys.stats(self.shards.tag(0)), keys.STATS_DUPLICATES, duplicates)
        results = self._run_scripts(calls)
        return [s for s, result in results.items() if result != 0]

    def _run_scripts(self, calls: dict[int, list[str | bytes]]) -> dict[int, Any]:
        """EVALSHA per shard in one pipeline (a cluster client sends each node its share); a
        server that lost the script (restart, failover) is given it and the call repeated."""
        results: dict[int, Any] = {}
        for _ in range(2):
            def issue(pipes: ShardPipes, todo: dict[int, list[str | bytes]] = calls) -> None:
                for s, args in todo.items():
                    route = keys.stats(self.shards.tag(s))  # KEYS[1]: the shard's stats key
                    pipes.to(s).evalsha(self._commit_sha, 1, route, *args)

            replies = self._routed(issue, raise_on_error=False)
            missing = {}
            for (s, args), reply in zip(calls.items(), replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing[s] = args
                elif isinstance(reply, Exception):  # MOVED, ASK: not run, _routed sends it again
                    raise reply
                else:
                    results[s] = reply
            if not missing:
                return results
            self._commit_sha = self.client.script_load(lua.COMMIT)
            calls = missing
        raise RuntimeError("the commit script could not be loaded")

    def _script_args(self, shard: int, p: Plan, guards: list[tuple[str, str, bytes]]) -> list[str | bytes]:
        """The commit script's arguments for one shard's plan; none when it writes nothing."""
        tag = self.shards.tag(shard)
        users = [(keys.user(u, tag), self._etag() + user.encode(st)) for u, st in p.users.items()]
        # One random etag for the commit's products: the script makes it the shard's catalog
        # generation (keys.catalog_generation), which must never repeat while a reader caches by it.
        generation = os.urandom(ETAG // 2).hex().encode()
        products = [(keys.product(pid, tag), generation + catalog.encode(a)) for pid, a in p.products.items()]
        docs = [(keys.product_doc(pid, tag), doc) for pid, doc in p.product_docs.items()]
        fields = []
        for cat, (dn, dc) in p.price_deltas.items():
            fields += [(keys.price_count_field(cat), str(dn)), (keys.price_cents_field(cat), str(dc))]
        if not (users or products or fields or p.items or p.impressions or p.queries or p.query_items
                or p.applied or p.offsets):
            return []
        s, cfg = self.streams, self.config
        marker_bucket = self._bucket(s.dedup_ttl_s)
        text_bucket = self._bucket(s.query_text_ttl_s)
        args: list[str | bytes] = [
            repr(cfg.item_half_life_s),
            repr(cfg.query_half_life_s),
            str(cfg.query_item_ttl_s * 1000),
            str(cfg.user_ttl_s * 1000),
            keys.applied_bucket(marker_bucket, tag),
            str((marker_bucket + 2) * s.dedup_ttl_s),
            keys.query_texts(text_bucket, tag),
            keys.query_texts(text_bucket - 1, tag),
            str((text_bucket + 2) * s.query_text_ttl_s),
            str(s.query_text_ttl_s * 1000),
            b"".join([b"%s\t%s\t%s\n" % (k.encode(), m.encode(), e) for k, m, e in guards]),
            "".join([f"{pid}\t{kind}\t{t!r}\n" for pid, kind, t in p.items]),
            "".join([f"{qid}\t{text}\n" for qid, text in p.queries]),
            "".join([f"{qid}\t{pid}\t{kind}\t{t!r}\n" for qid, pid, kind, t in p.query_items]),
            "".join([f"{m}\n" for m in p.applied]),
            "".join([f"{keys.offset(topic, part, tag)}\t{off}\n"
                     for (topic, part), off in p.offsets.items()]),
            "".join([f"{t!r}\t{' '.join(pids)}\n" for t, pids in p.impressions]),
            str(len(users)),
            str(len(products)),
            str(len(docs)),
            str(len(fields)),
            str(p.duplicates),
            repr(cfg.query_burst_half_life_s),
            tag,
        ]
        for pairs in (users, products, docs, fields):
            for k, v in pairs:
                args += [k, v]
        return args

    def forget(self, user_id: str, at: float) -> None:
        tag = self.shards.tag_of(user_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(keys.tombstone(user_id, tag), repr(at))
            pipe.delete(keys.user(user_id, tag))
            pipe.execute()

    def clear(self) -> int:
        """Delete every feature key that ``rebuild`` recomputes; tombstones stay. Returns count."""
        # The catalog generations first: a reader stops trusting its cached catalog before any
        # product goes.
        deleted = self._unlink([keys.catalog_generation(t) for t in self.shards.tags])
        globals_ = [name(t) for t in self.shards.tags
                    for name in (keys.category_prices, keys.query_words, keys.stats)]
        for prefix in keys.REBUILT:
            batch: list[bytes] = []
            for k in self.client.scan_iter(match=prefix + "*", count=5000):
                batch.append(k)
                if len(batch) >= 5000:
                    deleted += self._unlink(batch)
                    batch = []
            deleted += self._unlink(batch)
        return deleted + self._unlink(globals_)

    def _unlink(self, names: Sequence[str | bytes]) -> int:
        """UNLINK, one command per key on a cluster (keys of many slots)."""
        if not names:
            return 0
        if not self.cluster:
            return int(self.client.unlink(*names))
        with self.client.pipeline(transaction=False) as pipe:
            for k in names:
                pipe.unlink(k)
            return sum(pipe.execute())

    def offsets(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return stored_offsets(self.client, self.shards, partitions)

    def stats(self) -> dict[str, int]:
        return stats(self.client, self.shards)

    # --- reading ----------------------------------------------------------------------------

    def snapshot(
        self, users: Iterable[str], products: Sequence[str], evidence: Mapping[str, Sequence[str]]
    ) -> Snapshot:
        """One pipeline (on a cluster: one round trip per node): the shoppers, the products'
        attributes that :mod:`features.catalog_cache` lacks and the catalog generation that says
        whether what it holds still stands (one MGET per shard), the products' statistics (with
        owner shards, every shard's share, merged), each query text's evidence hash whole
        (HGETALL: it holds only the products the query led to, most often fewer than the
        candidates; a hash found larger than :data:`WHOLE_HASH_MAX` is read for the candidates
        only, HMGET, from then on, as a search context's always is), the category prices unless
        cached. A catalog changed since it was cached costs one more round trip."""
        tags, of, cfg = self.shards.tags, self.shards.of, self.config
        u_ids, p_ids = list(set(users)), list(dict.fromkeys(products))
        evidence = dict(evidence)  # tests pass [] for none
        large = self._large_hashes
        # Per shard, one MGET: the catalog generation, its shoppers, its products' attributes the
        # cache lacks, its share of every product's statistics.
        u_of: list[list[str]] = [u_ids] if len(tags) == 1 else [[] for _ in tags]
        p_of: list[list[str]] = [p_ids] if len(tags) == 1 else [[] for _ in tags]
        for u in u_ids if len(tags) > 1 else ():
            u_of[of(u)].append(u)
        for p in p_ids if len(tags) > 1 else ():
            p_of[of(p)].append(p)
        cached = [self._catalog.lookup(s, p_of[s]) for s in range(len(tags))]
        reads = [bool(u_of[s] or p_of[s] or p_ids) for s in range(len(tags))]

        def issue(pipes: ShardReads) -> None:
            for s, t in enumerate(tags):
                if reads[s]:
                    pipes.to(s).mget([keys.catalog_generation(t), *[keys.user(u, t) for u in u_of[s]],
                                      *[keys.product(p, t) for p in cached[s].misses],
                                      *[keys.item(p, t) for p in p_ids]])
            for text, pids in evidence.items():
                for s, t in enumerate(tags):
                    # A context's evidence (where, on what) spans the catalog: read for the candidates.
                    if text in large or text.startswith(query_item.CONTEXT):
                        pipes.to(s).hmget(keys.query_evidence(text, t), [keys.QUERY_TOTAL_FIELD, *pids])
                    else:
                        pipes.to(s).hgetall(keys.query_evidence(text, t))
            for s, t in enumerate(tags):
                if cached[s].prices is None:
                    pipes.to(s).hgetall(keys.category_prices(t))

        replies = iter(self._routed(issue, via=ShardReads))
        snap = Snapshot()
        item_parts = []
        generations: list[bytes | None] = [None] * len(tags)
        read_attrs: list[dict[str, ProductAttrs | None]] = [{} for _ in tags]
        for s in range(len(tags)):
            if not reads[s]:
                continue
            raw = next(replies)
            generations[s] = raw[0]
            for u, v in zip(u_of[s], raw[1:], strict=False):
                if v:
                    snap.users[u] = user.decode(v[ETAG:])
            at = 1 + len(u_of[s])
            misses = cached[s].misses
            read_attrs[s] = {p: self._decoded_attrs(v) if v else None
                             for p, v in zip(misses, raw[at:at + len(misses)], strict=True)}
            item_parts.append(_rows(p_ids, raw[at + len(misses):], item.SIZE))
        if item_parts:
            snap.item_rows = Rows.merged(item_parts, lambda st: item.merge(st, cfg.item_half_life_s))
        merge_q = lambda st: query_item.merge(st, cfg.query_half_life_s, cfg.query_burst_half_life_s)  # noqa: E731
        positions: dict[int, tuple[Sequence[str], dict[bytes, int]]] = {}  # by id(): requests share lists
        for text, pids in evidence.items():
            parts, totals = [], []
            known = positions.get(id(pids))
            if known is None:
                known = positions[id(pids)] = (pids, {p.encode(): i for i, p in enumerate(pids)})
            at = known[1]
            for _ in tags:
                reply = next(replies)
                if isinstance(reply, dict):  # the whole hash: the products the text led to
                    if len(reply) > WHOLE_HASH_MAX and len(large) < MAX_LARGE_HASHES:
                        large.add(text)
                    found = [(i, v) for f, v in reply.items() if (i := at.get(f)) is not None]
                    parts.append(_rows_at(pids, found, query_item.SIZE))
                    totals.append(reply.get(_TOTAL_FIELD))
                else:
                    parts.append(_rows(pids, reply[1:], query_item.SIZE))
                    totals.append(reply[0])
            snap.evidence[text] = Rows.merged(parts, merge_q)
            if len(totals) == 1:
                if totals[0] is not None:
                    snap.query_totals[text] = query_item.decode(totals[0])
            elif any(x is not None for x in totals):
                merged = Rows.merged([_rows([text], [x], query_item.SIZE) for x in totals], merge_q)
                snap.query_totals[text] = tuple(merged.states[0].tolist())
        prices = [_shard_prices(next(replies)) if c.prices is None else c.prices for c in cached]
        self._settle_catalog(snap, cached, generations, read_attrs, prices)
        snap.category_prices = _category_prices(prices)
        return snap

    def _settle_catalog(self, snap: Snapshot, cached: list[Lookup], generations: list[bytes | None],
                        read_attrs: list[dict[str, ProductAttrs | None]],
                        prices: list[dict[str, tuple[int, int]]]) -> None:
        """The snapshot's product attributes, and ``prices`` made current, per shard: the cache's
        where the generation read is the one it held them under; else read again with the
        generation (one pipeline for the stale shards). What was read is kept for the next reads."""
        tags = self.shards.tags
        stale = [s for s, c in enumerate(cached) if (c.hits or c.prices is not None)
                 and (generations[s] is None or generations[s] != c.generation)]
        again: dict[int, tuple[bytes | None, dict[str, ProductAttrs | None], dict[str, tuple[int, int]]]] = {}
        if stale:
            def issue(pipes: ShardReads) -> None:
                for s in stale:
                    pipes.to(s).mget([keys.catalog_generation(tags[s]),
                                      *[keys.product(p, tags[s]) for p in cached[s].hits]])
                    pipes.to(s).hgetall(keys.category_prices(tags[s]))

            replies = iter(self._routed(issue, via=ShardReads))
            for s in stale:
                raw, hash_ = next(replies), next(replies)
                attrs = {p: self._decoded_attrs(v) if v else None
                         for p, v in zip(cached[s].hits, raw[1:], strict=True)}
                again[s] = (raw[0], attrs, _shard_prices(hash_))
            log.debug("catalog_reread", shards=len(stale))
        for s, c in enumerate(cached):
            if s in again:
                generation, fresh, prices[s] = again[s]
                found = {**fresh, **read_attrs[s]}
                # The misses read first are as of the first generation: kept only if it still stands.
                self._catalog.keep(s, generation, found if generation == generations[s] else fresh, prices[s])
            else:
                self._catalog.keep(s, generations[s], read_attrs[s], prices[s] if c.prices is None else None)
                found = {**c.hits, **read_attrs[s]}
            snap.products.update((p, a) for p, a in found.items() if a is not None)

    def _decoded_attrs(self, stored: bytes) -> ProductAttrs:
        attrs = self._attrs.get(stored)
        if attrs is None:
            if len(self._attrs) >= ATTRS_MEMO_MAX:
                self._attrs.clear()
            attrs = self._attrs[stored] = catalog.decode(stored[ETAG:])
        return attrs

    def speller(self) -> Speller:
        """The trusted query words (at least ``spelling_min_clicks`` clicks), reloaded when older
        than ``spelling_refresh_s``: one ZRANGEBYSCORE a minute, not one per query (with owner
        shards, each shard's counts whole, added: a word is trusted on its total)."""
        cfg, now = self.config, time.monotonic()
        if self._speller is None or now - self._speller_loaded >= cfg.spelling_refresh_s:
            counts: dict[str, int] = {}
            if cfg.spelling_min_clicks > 0:
                low = cfg.spelling_min_clicks if self.shards.n == 1 else 1
                def issue(pipes: ShardPipes) -> None:
                    for s, t in enumerate(self.shards.tags):
                        pipes.to(s).zrangebyscore(keys.query_words(t), low, "+inf", withscores=True)

                for rows in self._routed(issue):
                    for w, n in rows:
                        counts[w.decode()] = counts.get(w.decode(), 0) + int(n)
            self._speller = Speller.of(counts, cfg.spelling_min_clicks)
            self._speller_loaded = now
        return self._speller

    def user(self, user_id: str) -> UserState | None:
        raw = self.client.get(keys.user(user_id, self.shards.tag_of(user_id)))
        return user.decode(raw[ETAG:]) if raw else None

    def have_users(self, user_ids: Sequence[str]) -> list[bool]:
        """Whether Redis holds each of these shoppers (one pipeline per node): what a freshness
        probe polls for."""
        tags, of = self.shards.tags, self.shards.of

        def issue(pipes: ShardPipes) -> None:
            for u in user_ids:
                pipes.to(of(u)).exists(keys.user(u, tags[of(u)]))

        return [bool(n) for n in self._routed(issue)]

    def users(self) -> dict[str, UserState]:
        out = {}
        for k in self.client.scan_iter(match=keys.USER + "*", count=5000):
            raw = self.client.get(k)
            if raw:
                out[self.shards.strip(k.decode()[len(keys.USER):])] = user.decode(raw[ETAG:])
        return out

    def products(self, product_ids: Sequence[str]) -> dict[str, CatalogProduct]:
        ids = list(product_ids)
        names = [keys.product_doc(p, self.shards.tag_of(p)) for p in ids]
        return catalog.documents(ids, mget_any(self.client, names) if ids else [])

    def item(self, product_id: str) -> tuple[float, ...]:
        rows = self.snapshot([], [product_id], {}).item_rows
        return tuple(rows.states[0].tolist()) if rows.present[0] else item.EMPTY


def stored_offsets(client: Client, shards: Shards, partitions: Sequence[tuple[str, int]]
                   ) -> dict[tuple[str, int], int]:
    """The last offset of each partition whose effect is in Redis (absent: none): the lowest any
    shard holds (every shard records every batch's ends; after a crash between the shards'
    commits, the shards that had committed skip what is replayed)."""
    if not partitions:
        return {}
    raw = mget_any(client, [keys.offset(t, p, tag) for tag in shards.tags for t, p in partitions])
    out: dict[tuple[str, int], int] = {}
    for tp, v in zip(list(partitions) * shards.n, raw, strict=True):
        if v is not None:
            out[tp] = min(out.get(tp, int(v)), int(v))
    return out


def stats(client: Client, shards: Shards) -> dict[str, int]:
    """The feature workers' counters (``stats``: events applied, duplicates skipped), over the shards."""
    out: dict[str, int] = {}
    for t in shards.tags:
        for k, v in client.hgetall(keys.stats(t)).items():
            out[k.decode()] = out.get(k.decode(), 0) + int(v)
    return out


def mget_any(client: Client, names: Sequence[str]) -> list[bytes | None]:
    """MGET; on a cluster, one per slot (keys of many slots)."""
    return client.mget_nonatomic(names) if isinstance(client, RedisCluster) else client.mget(names)


def _rows(ids: Sequence[str], raw: Sequence[bytes | None], size: int) -> Rows:
    """Fixed-layout values as :class:`Rows`, decoded with one numpy call; a value of an older,
    shorter layout (fewer doubles) reads its missing ones as zeros, as one-by-one decoding did."""
    width, zero = 8 * size, bytes(8 * size)
    blob = b"".join([zero if v is None else (v if len(v) == width else (v + zero)[:width]) for v in raw])
    states = np.frombuffer(blob, "<f8").reshape(len(ids), size)
    return Rows(ids, states, np.array([v is not None for v in raw], dtype=bool))


def _rows_at(ids: Sequence[str], found: list[tuple[int, bytes]], size: int) -> Rows:
    """:func:`_rows` of ``ids`` where only the rows ``found`` (index, stored value) have a value:
    a query's evidence names a few of the candidates."""
    states = np.zeros((len(ids), size))
    present = np.zeros(len(ids), dtype=bool)
    if found:
        rows = [i for i, _ in found]
        states[rows] = _rows(rows, [v for _, v in found], size).states  # type: ignore[arg-type]
        present[rows] = True
    return Rows(ids, states, present)


def _shard_prices(raw: dict[bytes, bytes]) -> dict[str, tuple[int, int]]:
    """Category (products, summed cents) from one shard's ``cp`` hash."""
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    for f, v in raw.items():
        if (field := keys.price_field(f.decode())) is not None:
            kind, category = field
            (counts if kind == keys.PRICE_COUNT else totals)[category] = int(v)
    return {c: (n, totals.get(c, 0)) for c, n in counts.items()}


def _category_prices(shards: Sequence[dict[str, tuple[int, int]]]) -> dict[str, tuple[int, int]]:
    """The shards' category price sums (:func:`_shard_prices`), added (integers: exact in any order)."""
    if len(shards) == 1:
        return shards[0]
    out: dict[str, tuple[int, int]] = {}
    for prices in shards:
        for c, (n, cents) in prices.items():
            n0, c0 = out.get(c, (0, 0))
            out[c] = (n0 + n, c0 + cents)
    return out
