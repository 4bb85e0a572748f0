"""A shopper's profile as the feature store holds it, read through the store's public API
(``FeatureStore.user``, ``products``) and the feature rules that interpret it (``features.user``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from core.settings import FeatureSettings
from features import user
from features.store import FeatureStore
from features.user import UserState

KINDS = {user.CLICK: "click", user.CART: "add to cart", user.PURCHASE: "purchase"}


def when(t: float) -> str:
    """Epoch seconds as a readable UTC time."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class RecentRow:
    product_id: str
    title: str | None
    kind: str
    at: str
    weight: float  # kind x recency as of ``now``: what the model's interest match reads


@dataclass(frozen=True)
class Affinity:
    key: str
    share: float  # of the shopper's decayed attention


@dataclass(frozen=True)
class Profile:
    user_id: str
    state: UserState
    now: float
    live: bool  # not expired as of ``now`` (user_ttl_s, event time)
    recent: list[RecentRow]
    categories: list[Affinity]
    brands: list[Affinity]
    price_ratio: float | None  # price / category typical, kind-weighted geometric mean over interactions

    @property
    def first_seen(self) -> str:
        return when(self.state.first_seen)

    @property
    def last_seen(self) -> str:
        return when(self.state.last_seen)

    @property
    def context_at(self) -> str | None:
        return when(self.state.context_at) if self.state.context_at else None

    @property
    def price_sensitivity(self) -> str:
        if self.price_ratio is None:
            return "unknown (nothing priced yet)"
        pct = (self.price_ratio - 1) * 100
        side = "above" if pct >= 0 else "below"
        return f"shops {abs(pct):.0f}% {side} their categories' typical price"


def _shares(weights: dict[str, float]) -> list[Affinity]:
    total = sum(weights.values())
    return [Affinity(k, user.affinity_share(weights, k, total))
            for k, _ in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))]


def profile(store: FeatureStore, user_id: str, cfg: FeatureSettings, now: float) -> Profile | None:
    """The shopper's stored state, read for a person (None: the store has no such shopper)."""
    state = store.user(user_id)
    if state is None:
        return None
    interest = user.interest(state, now, cfg)
    docs = store.products([r.product_id for r in state.recent])
    recent = [RecentRow(r.product_id, docs[r.product_id].title if r.product_id in docs else None,
                        KINDS.get(r.kind, str(r.kind)), when(r.at), interest.get(r.product_id, 0.0))
              for r in reversed(state.recent)]  # newest first
    level = user.price_level(state)
    return Profile(user_id, state, now, user.is_live(state, now, cfg), recent, _shares(state.categories),
                   _shares(state.brands), None if level is None else math.exp(level))
