"""The whole Redis layout, on one screen. Every key the engine writes starts with one of these.

=====================  =====================================================  ==================
key                    value                                                  expiry
=====================  =====================================================  ==================
``u:{user}``           etag (12 bytes) + msgpack :class:`features.user.UserState` user_ttl_s, renewed
``x:{user}``           forgotten at (epoch s): events up to then are ignored  none
``p:{product}``        etag + msgpack :class:`features.catalog.ProductAttrs`  none
``pd:{product}``       the product as the catalog sent it (contract JSON)     none
``cp``                 hash ``n:{category}`` / ``c:{category}``: products,     none
                       summed price in cents (typical price = c / n / 100)
``cg``                 the catalog's generation: the etag of the last commit  none
                       that wrote ``p:`` keys (random, never repeated), so a
                       reader's cached ``p:`` and ``cp`` values are checked
                       with one key per read
``i:{product}``        10 little-endian doubles, :mod:`features.item`          none
``qh:{q}``             hash: product id -> 6 doubles (features.query_item),   query_item_ttl_s
                       what followed query q for that product, and field      after the hash's
                       ``""`` -> the query's totals (q = normalized query     last write (per
                       text, ``_{word}`` for one of its words, or a search    query, not per
                       context ``@location:{where}``, ``@location`` ...):     product)
                       a query's evidence for all candidates in one HMGET
``qv``                 sorted set: query word -> clicks that followed it      none
                       (:mod:`features.speller`'s dictionary)
``qt:{bucket}``        hash query_id -> stored text (key and words), for      1-2 x query_text_ttl_s
                       joining clicks
``qp:{query_id}``      clicks waiting for their query's text, one per line    query_text_ttl_s
``d:{bucket}``         hash of "event applied" markers ``{kind}:{id}``; kind  1-2 x dedup_ttl_s
                       e (interaction), q (query), r (ranked result)
``o:{topic}:{part}``   last Kafka offset whose effect is in Redis             none
``stats``              hash: ``applied`` events, skipped ``duplicates``       none
``pe:{tower}``         hash product id -> 32-byte header (16 hex updated_at  none
                       ms, 16 hex digest of the text) + float32 LE vector
                       from product tower ``tower`` (features.embeddings;
                       braces literal: a hash tag, one slot with ``pef:``)
``pef:{tower}``        stream: ids of products whose vector changed (field  trimmed near
                       ``p``), the feed scorers follow                        100,000 entries
``lease:trainer``      the continuous trainer's lease: holder token           lease_ttl_s, renewed
                       (host:pid:random); one trainer writes at a time
``j{p}:l:{query_id}``  joiner: a list it holds (msgpack streams.join.OpenList) deleted when closed
``j{p}:due``           joiner: sorted set query_id -> event time it is next   none
                       due (emission, then forgetting)
``j{p}:u:{user}``      joiner: sorted set query_id -> served time, the        emptied with lists
                       shopper's held lists (attribution without query_id)
``j{p}:o``             joiner: hash topic -> last offset applied              none
``j{p}:t``             joiner: hash topic -> latest event time read, and      none
                       ``w``, the partition's watermark
``j{p}:x``             joiner: stream, labeled lists awaiting publication     entries deleted
                       (the outbox; entry id = publication sequence)          once acknowledged
``j{p}:stats``         joiner: hash of counts (clicks, matched, lists, ...)   none
=====================  =====================================================  ==================

The joiner's keys are per partition ``p`` of its inputs and carry ``{p}`` as a Redis Cluster hash
tag: one partition's state commits in one transaction, in one slot.

Owner shards (``SHOPRANK_FEATURES_SHARDS`` = n > 1, needed on a Redis Cluster): every key the
feature workers write carries its shard's hash tag right after its prefix (``u:{s3.3}alice``,
``i:{s3.3}B0012``, ``cp{s3.3}``, ``o:{s3.3}shoprank.queries:2``; :attr:`Shards.tags`), so all
keys of one shard live in one slot and a batch commits one script per shard. An event belongs to
the shard of its owner (the shopper; the product for catalog updates,
:func:`features.plan.owner`), and everything it writes goes to that shard: its owner's state,
and its share of the shared aggregates (``i:``, ``qh:``, ``qv``, ``cp``, ``stats``), which the
read path merges over the shards. With n = 1 keys carry no tag: the layout above, unchanged.
"""

from __future__ import annotations

import zlib
from functools import cached_property
from typing import Final

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

USER: Final = "u:"
TOMBSTONE: Final = "x:"
PRODUCT: Final = "p:"
PRODUCT_DOC: Final = "pd:"
CATEGORY_PRICES: Final = "cp"
CATALOG_GENERATION: Final = "cg"
ITEM: Final = "i:"
QUERY_EVIDENCE: Final = "qh:"
QUERY_TOTAL_FIELD: Final = ""  # the field of a ``qh:`` hash that holds the query's totals
QUERY_WORDS: Final = "qv"
QUERY_TEXT: Final = "qt:"
QUERY_PENDING: Final = "qp:"
APPLIED: Final = "d:"
OFFSET: Final = "o:"
STATS: Final = "stats"
STATS_APPLIED: Final = "applied"  # the fields of ``stats``
STATS_DUPLICATES: Final = "duplicates"
PRODUCT_EMB: Final = "pe:"
PRODUCT_EMB_FEED: Final = "pef:"
TRAINER_LEASE: Final = "lease:trainer"

JOIN: Final = "j{"

#: Prefixes of layouts no longer written: ``qi:{product}:{q}`` and ``qc:{q}``, one key per query
#: and product and one per query, before ``qh:{q}`` held both. ``rebuild`` clears them too.
RETIRED: Final = ("qi:", "qc:")

#: Everything ``rebuild`` clears (tombstones survive: a forgotten shopper stays forgotten).
REBUILT: Final = (USER, PRODUCT, PRODUCT_DOC, ITEM, QUERY_EVIDENCE, QUERY_TEXT, QUERY_PENDING, APPLIED,
                  OFFSET, *RETIRED)


class Shards:
    """The owner shards of the feature state: which shard an id belongs to, and each shard's hash
    tag. Tags are chosen so that shard ``s`` of ``n`` hashes into the ``s``-th of ``n`` equal slot
    ranges: a cluster created with its slots split evenly gets its shards split evenly too."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"shards must be at least 1, got {n}")
        self.n = n

    def of(self, owner_id: str) -> int:
        """The shard of a shopper (or, for catalog state, a product)."""
        return 0 if self.n == 1 else zlib.crc32(owner_id.encode()) % self.n

    def tag(self, shard: int) -> str:
        return self.tags[shard]

    def tag_of(self, owner_id: str) -> str:
        return self.tags[self.of(owner_id)]

    @cached_property
    def tags(self) -> list[str]:
        if self.n == 1:
            return [""]
        width = REDIS_CLUSTER_HASH_SLOTS / self.n
        tags = []
        for s in range(self.n):
            k = 0
            while int(key_slot(f"s{s}.{k}".encode()) // width) != s:
                k += 1
            tags.append(f"{{s{s}.{k}}}")
        return tags

    def strip(self, rest: str) -> str:
        """A key's id without its tag: ``{s3.17}alice`` -> ``alice``."""
        if self.n > 1 and rest.startswith("{"):
            return rest[rest.index("}") + 1:]
        return rest


def user(user_id: str, tag: str = "") -> str:
    return USER + tag + user_id


def tombstone(user_id: str, tag: str = "") -> str:
    return TOMBSTONE + tag + user_id


def product(product_id: str, tag: str = "") -> str:
    return PRODUCT + tag + product_id


def product_doc(product_id: str, tag: str = "") -> str:
    return PRODUCT_DOC + tag + product_id


def item(product_id: str, tag: str = "") -> str:
    return ITEM + tag + product_id


def category_prices(tag: str = "") -> str:
    return CATEGORY_PRICES + tag


def catalog_generation(tag: str = "") -> str:
    return CATALOG_GENERATION + tag


def query_words(tag: str = "") -> str:
    return QUERY_WORDS + tag


def stats(tag: str = "") -> str:
    return STATS + tag


def query_evidence(text: str, tag: str = "") -> str:
    """The hash of what followed query (or ``_{word}``) ``text``: one field per product, and
    :data:`QUERY_TOTAL_FIELD`. One expiry per query: Redis 7.0 has no expiry per hash field
    (HEXPIRE came in 7.4), so a product's evidence lives as long as its query keeps being
    followed by clicks; it decays to nothing meanwhile, and a query's hash holds at most the
    products that query ever led to."""
    return QUERY_EVIDENCE + tag + text


def query_texts(bucket: int, tag: str = "") -> str:
    """Query texts are kept per time bucket of ``query_text_ttl_s``: this one and the previous."""
    return f"{QUERY_TEXT}{tag}{bucket}"


def applied(kind: str, event_id: str) -> str:
    """The marker of an event: a field of the current bucket's hash (see :func:`applied_bucket`)."""
    return f"{kind}:{event_id}"


def applied_bucket(bucket: int, tag: str = "") -> str:
    """Markers are kept per time bucket of ``dedup_ttl_s``: this one and the previous are read."""
    return f"{APPLIED}{tag}{bucket}"


def offset(topic: str, partition: int, tag: str = "") -> str:
    return f"{OFFSET}{tag}{topic}:{partition}"


def product_embeddings(tower: str) -> str:
    """Not in REBUILT: embeddings are the embedder's, recomputed from the catalog, not the log."""
    return f"{PRODUCT_EMB}{{{tower}}}"


def product_embedding_feed(tower: str) -> str:
    return f"{PRODUCT_EMB_FEED}{{{tower}}}"


PRICE_COUNT: Final = "n:"  # the two kinds of ``cp`` field
PRICE_CENTS: Final = "c:"


def price_count_field(category: str) -> str:
    return PRICE_COUNT + category


def price_cents_field(category: str) -> str:
    return PRICE_CENTS + category


def price_field(field: str) -> tuple[str, str] | None:
    """The kind (:data:`PRICE_COUNT` or :data:`PRICE_CENTS`) and category of a ``cp`` field."""
    kind, category = field[:2], field[2:]
    return (kind, category) if kind in (PRICE_COUNT, PRICE_CENTS) else None


def join_list(partition: int, query_id: str) -> str:
    return f"j{{{partition}}}:l:{query_id}"


def join_due(partition: int) -> str:
    return f"j{{{partition}}}:due"


def join_user(partition: int, user_id: str) -> str:
    return f"j{{{partition}}}:u:{user_id}"


def join_offsets(partition: int) -> str:
    return f"j{{{partition}}}:o"


def join_clock(partition: int) -> str:
    return f"j{{{partition}}}:t"


def join_outbox(partition: int) -> str:
    return f"j{{{partition}}}:x"


def join_stats(partition: int) -> str:
    return f"j{{{partition}}}:stats"
