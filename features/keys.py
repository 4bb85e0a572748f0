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
``i:{product}``        10 little-endian doubles, :mod:`features.item`          none
``qi:{product}:{q}``   6 doubles, :mod:`features.query_item` (q = normalized   query_item_ttl_s
                       query text, or ``_{word}`` for one of its words; never
                       holds ``:``)
``qc:{q}``             6 doubles, the query's (or word's) totals               query_item_ttl_s
``qv``                 sorted set: query word -> clicks that followed it      none
                       (:mod:`features.speller`'s dictionary)
``qt:{bucket}``        hash query_id -> stored text (key and words), for      1-2 x query_text_ttl_s
                       joining clicks
``qp:{query_id}``      clicks waiting for their query's text, one per line    query_text_ttl_s
``d:{bucket}``         hash of "event applied" markers ``{kind}:{id}``; kind  1-2 x dedup_ttl_s
                       e (interaction), q (query), r (ranked result)
``o:{topic}:{part}``   last Kafka offset whose effect is in Redis             none
``stats``              hash: ``applied`` events, skipped ``duplicates``       none
=====================  =====================================================  ==================
"""

from __future__ import annotations

from typing import Final

USER: Final = "u:"
TOMBSTONE: Final = "x:"
PRODUCT: Final = "p:"
PRODUCT_DOC: Final = "pd:"
CATEGORY_PRICES: Final = "cp"
ITEM: Final = "i:"
QUERY_ITEM: Final = "qi:"
QUERY_TOTAL: Final = "qc:"
QUERY_WORDS: Final = "qv"
QUERY_TEXT: Final = "qt:"
QUERY_PENDING: Final = "qp:"
APPLIED: Final = "d:"
OFFSET: Final = "o:"
STATS: Final = "stats"

#: Everything ``rebuild`` clears (tombstones survive: a forgotten shopper stays forgotten).
REBUILT: Final = (USER, PRODUCT, PRODUCT_DOC, ITEM, QUERY_ITEM, QUERY_TOTAL, QUERY_TEXT,
                  QUERY_PENDING, APPLIED, OFFSET)


def user(user_id: str) -> str:
    return USER + user_id


def tombstone(user_id: str) -> str:
    return TOMBSTONE + user_id


def product(product_id: str) -> str:
    return PRODUCT + product_id


def product_doc(product_id: str) -> str:
    return PRODUCT_DOC + product_id


def item(product_id: str) -> str:
    return ITEM + product_id


def query_item(text: str, product_id: str) -> str:
    return f"{QUERY_ITEM}{product_id}:{text}"


def query_total(text: str) -> str:
    return QUERY_TOTAL + text


def query_texts(bucket: int) -> str:
    """Query texts are kept per time bucket of ``query_text_ttl_s``: this one and the previous."""
    return f"{QUERY_TEXT}{bucket}"


def query_pending(query_id: str) -> str:
    return QUERY_PENDING + query_id


def applied(kind: str, event_id: str) -> str:
    """The marker of an event: a field of the current bucket's hash (see :func:`applied_bucket`)."""
    return f"{kind}:{event_id}"


def applied_bucket(bucket: int) -> str:
    """Markers are kept per time bucket of ``dedup_ttl_s``: this one and the previous are read."""
    return f"{APPLIED}{bucket}"


def offset(topic: str, partition: int) -> str:
    return f"{OFFSET}{topic}:{partition}"


def price_count_field(category: str) -> str:
    return "n:" + category


def price_cents_field(category: str) -> str:
    return "c:" + category
