"""Per-shopper features: recent products, decayed category and brand affinities, price sensitivity,
counters, first and last seen, last known location and device.

The state stays small (about 0.5-1 KB as msgpack with the default caps): ``recent`` keeps the
last ``recent_n`` interactions, affinities keep the ``affinity_top_k`` strongest entries. All
decayed quantities share one reference time ``aff_t`` and one half-life, so moving them to a new
time is one multiplication each. A shopper idle for longer than ``user_ttl_s`` (event time)
starts afresh, exactly as the Redis TTL would have dropped them.
"""

from __future__ import annotations

import bisect
import math
from typing import Final

import msgspec

from core.events import AddToCart, Click, Interaction, Purchase, Query
from core.settings import FeatureSettings
from features.catalog import ProductAttrs

CLICK: Final = 1
CART: Final = 2
PURCHASE: Final = 3
KIND_OF: Final[dict[type, int]] = {Click: CLICK, AddToCart: CART, Purchase: PURCHASE}


class Recent(msgspec.Struct, array_like=True, frozen=True):
    """One interaction: product, kind (1 click, 2 add-to-cart, 3 purchase), unix seconds."""

    product_id: str
    kind: int
    at: int


class UserState(msgspec.Struct, array_like=True, frozen=True):
    first_seen: float
    last_seen: float
    n_clicks: int = 0
    n_carts: int = 0
    n_purchases: int = 0
    n_searches: int = 0
    recent: tuple[Recent, ...] = ()
    aff_t: float = 0.0
    categories: dict[str, float] = {}
    brands: dict[str, float] = {}
    # Decayed, kind-weighted sum of log(price / category's typical price) over what the shopper
    # clicked, carted and bought, and its decayed weight: the price level they shop at.
    price_sum: float = 0.0
    price_weight: float = 0.0
    location: str | None = None
    device: str | None = None
    context_at: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(UserState)


def encode(state: UserState) -> bytes:
    return _encoder.encode(state)


def decode(data: bytes) -> UserState:
    return _decoder.decode(data)


def kind_weight(kind: int, cfg: FeatureSettings) -> float:
    return {CLICK: cfg.click_weight, CART: cfg.cart_weight, PURCHASE: cfg.purchase_weight}[kind]


def is_live(state: UserState | None, t: float, cfg: FeatureSettings) -> bool:
    """Whether ``state`` still exists at event time ``t`` (idle shoppers expire)."""
    return state is not None and t - state.last_seen <= cfg.user_ttl_s


def _fresh(state: UserState | None, t: float, cfg: FeatureSettings) -> UserState:
    if state is not None and is_live(state, t, cfg):
        return state
    return UserState(first_seen=t, last_seen=t)


def on_query(state: UserState | None, query: Query, cfg: FeatureSettings) -> UserState:
    """A search: one more search, last seen, and where and on what the shopper searched."""
    t = query.timestamp.timestamp()
    s = _fresh(state, t, cfg)
    ctx = query.context
    location, device, context_at = s.location, s.device, s.context_at
    if t >= s.context_at:
        location = ctx.location or location
        device = ctx.device or device
        context_at = t
    return msgspec.structs.replace(
        s,
        first_seen=min(s.first_seen, t),
        last_seen=max(s.last_seen, t),
        n_searches=s.n_searches + 1,
        location=location,
        device=device,
        context_at=context_at,
    )


def on_interaction(
    state: UserState | None,
    event: Interaction,
    product: ProductAttrs,
    typical_price: float | None,
    cfg: FeatureSettings,
) -> UserState:
    """A click, add-to-cart or purchase of ``product`` (its catalog attributes at that time)."""
    t = event.timestamp.timestamp()
    s = _fresh(state, t, cfg)
    kind = KIND_OF[type(event)]
    weight = kind_weight(kind, cfg)
    h = cfg.user_half_life_s

    categories, brands = dict(s.categories), dict(s.brands)
    price_sum, price_weight, aff_t = s.price_sum, s.price_weight, s.aff_t
    if t > aff_t:
        f = 2.0 ** (-(t - aff_t) / h)
        categories = {k: v * f for k, v in categories.items()}
        brands = {k: v * f for k, v in brands.items()}
        price_sum, price_weight, aff_t = price_sum * f, price_weight * f, t
        g = weight
    else:
        g = weight * 2.0 ** (-(aff_t - t) / h)
    if product.category is not None:
        categories[product.category] = categories.get(product.category, 0.0) + g
    if product.brand is not None:
        brands[product.brand] = brands.get(product.brand, 0.0) + g
    price = event.price or product.price  # what the event says it cost, else the catalog's
    if typical_price and price and price > 0:
        price_sum = price_sum + g * math.log(price / typical_price)
        price_weight = price_weight + g

    return msgspec.structs.replace(
        s,
        first_seen=min(s.first_seen, t),
        last_seen=max(s.last_seen, t),
        n_clicks=s.n_clicks + (kind == CLICK),
        n_carts=s.n_carts + (kind == CART),
        n_purchases=s.n_purchases + (kind == PURCHASE),
        recent=_push_recent(s.recent, Recent(event.product_id, kind, int(t)), cfg.recent_n),
        aff_t=aff_t,
        categories=_top(categories, cfg.affinity_top_k),
        brands=_top(brands, cfg.affinity_top_k),
        price_sum=price_sum,
        price_weight=price_weight,
    )


def _push_recent(recent: tuple[Recent, ...], entry: Recent, n: int) -> tuple[Recent, ...]:
    """Insert in time order (after equal times, so log order breaks ties) and keep the newest n."""
    items = list(recent)
    bisect.insort_right(items, entry, key=lambda r: r.at)
    return tuple(items[-n:])


def _top(weights: dict[str, float], k: int) -> dict[str, float]:
    if len(weights) <= k:
        return weights
    kept = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return dict(kept)


# --- reading --------------------------------------------------------------------------------


def affinity_share(weights: dict[str, float], key: str | None, total: float | None = None,
                   prior_weight: float = 0.0) -> float:
    """Share of the shopper's (decayed) attention that went to ``key``; decay cancels out.
    ``total``: ``sum(weights.values())`` when the caller has it (one sum for many candidates).
    ``prior_weight``: that much attention counted as spread elsewhere (``FeatureSettings.
    preference_prior_weight``), so a shopper with little history reads as little preference."""
    if key is None or key not in weights:
        return 0.0
    if total is None:
        total = sum(weights.values())
    return weights[key] / (total + prior_weight) if total + prior_weight > 0 else 0.0


def price_level(state: UserState, prior_weight: float = 0.0) -> float | None:
    """Kind-weighted mean log(price / category typical price) of what the shopper clicked, carted
    and bought: > 0 shops above typical. None: nothing priced yet. ``prior_weight``: that much
    weight of typical-priced interactions added (``FeatureSettings.preference_prior_weight``), so
    one click on an expensive product reads as a lean, not as the shopper's whole level."""
    if state.price_weight <= 0:
        return None
    return state.price_sum / (state.price_weight + prior_weight)


def interest(state: UserState, now: float, cfg: FeatureSettings) -> dict[str, float]:
    """Recent products weighted by kind (purchase > add-to-cart > click) and recency as of ``now``."""
    out: dict[str, float] = {}
    h = cfg.recent_half_life_s
    for r in state.recent:
        w = kind_weight(r.kind, cfg) * 2.0 ** (-max(0.0, now - r.at) / h)
        out[r.product_id] = out.get(r.product_id, 0.0) + w
    return out
