"""Product attributes from the catalog, and each category's typical price.

The typical price of a category is the mean catalog price of its products, kept as integer cents
and a count so that it is exact whatever order catalog updates arrive in (a purchase's price
ratio, part of the shopper's features, depends on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import structlog

from core.events import CATALOG, CatalogProduct, InvalidEvent

log = structlog.get_logger(__name__)


class ProductAttrs(msgspec.Struct, array_like=True, frozen=True):
    """What features need of a product. ``first_seen``: earliest ``updated_at`` (item age);
    ``released``: the catalog's ``released_at`` (epoch s), None when it gives none (last, with a
    default, so values stored before it existed still decode)."""

    category: str | None
    brand: str | None
    price: float | None
    first_seen: float
    updated_at: float
    released: float | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ProductAttrs)


def encode(attrs: ProductAttrs) -> bytes:
    return _encoder.encode(attrs)


def decode(data: bytes) -> ProductAttrs:
    return _decoder.decode(data)


def category_of(product: CatalogProduct) -> str | None:
    """The leaf of the category path: the level at which shoppers compare products."""
    return product.category_path[-1] if product.category_path else None


def brand_key(brand: str | None) -> str | None:
    """Brands as shoppers' affinities count them: case and outer spaces do not matter."""
    if brand is None:
        return None
    key = brand.strip().casefold()
    return key or None


def cents(price: float | None) -> int | None:
    return None if price is None else round(price * 100)


def on_product(old: ProductAttrs | None, product: CatalogProduct) -> ProductAttrs | None:
    """The new attributes, or None when ``product`` is older than what is stored (stale replay)."""
    t = product.updated_at.timestamp()
    if old is not None and t < old.updated_at:
        return None
    first = t if old is None else min(old.first_seen, t)
    released = product.released_at.timestamp() if product.released_at is not None else None
    return ProductAttrs(category_of(product), brand_key(product.brand), product.price, first, t, released)


def price_deltas(old: ProductAttrs | None, new: ProductAttrs) -> dict[str, tuple[int, int]]:
    """Change to each category's (count, cents) when a product moves from ``old`` to ``new``."""
    deltas: dict[str, tuple[int, int]] = {}
    for attrs, sign in ((old, -1), (new, 1)):
        c = cents(attrs.price) if attrs is not None else None
        if attrs is None or attrs.category is None or c is None:
            continue
        n0, c0 = deltas.get(attrs.category, (0, 0))
        deltas[attrs.category] = (n0 + sign, c0 + sign * c)
    return {k: v for k, v in deltas.items() if v != (0, 0)}


def typical_price(count: int, total_cents: int) -> float | None:
    """Mean price of a category, None when it has no priced product."""
    if count <= 0:
        return None
    return total_cents / count / 100.0


def documents(product_ids: Sequence[str], raws: Sequence[bytes | None]) -> dict[str, CatalogProduct]:
    """Stored catalog documents (``pd:``) decoded by product id; missing or unreadable ones left out."""
    out = {}
    for pid, raw in zip(product_ids, raws, strict=True):
        if raw:
            try:
                out[pid] = CATALOG.decode(raw)
            except InvalidEvent:
                log.warning("product_doc_invalid", product_id=pid)
    return out
