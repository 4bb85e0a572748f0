"""The catalog a Redis reader keeps between reads, trusted while its shard's generation holds.

Every query reads the attributes (``p:``) of each of its candidates and the category prices
(``cp``), yet both change only when the catalog does. Each commit that writes products sets its
shard's generation (``cg``, :func:`features.keys.catalog_generation`) to their etag, random per
commit, in the same script. A read asks for ``cg`` in the same MGET as the shoppers and the
item statistics (one command: one moment) and uses what this cache holds only when the
generation it read is the one the cache holds it under; otherwise it reads those again (one more
round trip per shard and catalog change) and the cache starts over from them. Nothing is kept
while a shard has no generation (a store written before it existed, or just cleared).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from features.catalog import ProductAttrs


@dataclass
class _Shard:
    generation: bytes | None = None
    attrs: dict[str, ProductAttrs | None] = field(default_factory=dict)  # None: no such product
    prices: dict[str, tuple[int, int]] | None = None  # the shard's ``cp``: category -> (n, cents)


@dataclass(frozen=True)
class Lookup:
    """What the cache held of one shard's products at one moment: the generation they are valid
    for, the attributes it had (``hits``), the products it lacked, the shard's prices if it had them."""

    generation: bytes | None
    hits: dict[str, ProductAttrs | None]
    misses: list[str]
    prices: dict[str, tuple[int, int]] | None


class CatalogCache:
    """Per owner shard, product attributes and the category prices as of one generation. Shared
    by the threads of a process (the scorer reads from two): a lock around each step."""

    def __init__(self, shards: int, max_products: int) -> None:
        self._shards = [_Shard() for _ in range(shards)]
        self._max = max(1, max_products // shards)  # per shard; past it a shard starts over
        self._lock = threading.Lock()

    def lookup(self, shard: int, products: Sequence[str]) -> Lookup:
        with self._lock:
            s = self._shards[shard]
            if s.generation is None:
                return Lookup(None, {}, list(products), None)
            attrs = s.attrs
            hits = {p: attrs[p] for p in products if p in attrs}
            misses = [p for p in products if p not in hits] if len(hits) < len(products) else []
            return Lookup(s.generation, hits, misses, s.prices)

    def keep(self, shard: int, generation: bytes | None, attrs: Mapping[str, ProductAttrs | None],
             prices: dict[str, tuple[int, int]] | None) -> None:
        """Keep values read in the same command as ``generation`` (prices: right after it). A
        generation other than the cache's replaces everything it held; None keeps nothing."""
        with self._lock:
            s = self._shards[shard]
            if generation is None or generation != s.generation or len(s.attrs) + len(attrs) > self._max:
                s.generation, s.attrs, s.prices = generation, {}, None
                if generation is None:
                    return
            s.attrs.update(attrs)
            if prices is not None:
                s.prices = prices
