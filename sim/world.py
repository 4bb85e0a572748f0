"""SIMULATION: the shoppers, their searches and how they answer a served list.

On the real Best Buy catalog (437 products) and real query texts (those followed by at least
``min_query_clicks`` training-period clicks). For shopper u, query q and product p the true
attractiveness (the probability that u clicks p once u looks at it) is

    a(u, q, p) = top * rel(q, p) * exp(pref(u, p) + noise(u, p)) / max over p' of the same

- ``rel(q, p)``: p's training-period clicks after q over the query's most clicked product's (at
  least ``floor``): the query's base relevance, the same for everyone;
- ``pref(u, p)``, one term per preference dimension (each with its ``*_strength``):
  taste (franchise/genre: a few liked franchise groups, from titles, else the publisher),
  edition (standard vs limited/collector's/premium-priced), price (sensitivity against the
  product's standardized log price), region (the shopper's region's popularity skew);
- ``noise(u, p)``: an idiosyncratic taste nobody observes (N(0, noise)).

The oracle knows pref (every dimension) but not the noise; the population ranking knows only rel.

Shoppers return over simulated days (sessions per day ~ Poisson(visits_per_day x activity)),
search 1 + Geometric(searches_per_session - 1) times per session, minutes apart, picking queries
by frequency tilted toward their taste. A served list is read as a cascade: the first position
is always looked at, each next one with probability ``desktop_patience`` or ``mobile_patience``
(the device's position bias); a looked-at product is clicked with probability a(u, q, p); after a
click the shopper goes on with probability ``continue_after_click``. A click becomes an
add-to-cart with probability ``cart_rate`` tilted by price sensitivity, a cart a purchase with
``purchase_rate``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Final

import numpy as np

from core.events import CatalogProduct
from core.text import normalize_query, words
from evaluation.ranker import SearchRow

DIMENSIONS: Final = ("taste", "edition", "price", "region")
_PREMIUM = re.compile(
    r"\b(limited|collector'?s?|hardened|prestige|legendary|special|premium|deluxe|"
    r"bundle|elite|ultimate|gold|game of the year|goty)\b",
    re.I,
)


@dataclass(frozen=True)
class SimParams:
    """Every knob of the simulation (each a command-line option, ``sim.cli``)."""

    shoppers: int = 150
    days: int = 20  # a loop needs days of a shopper's history (and of lists) to learn from
    seed: int = 0
    visits_per_day: float = 0.5  # mean sessions per shopper per day (times the shopper's activity)
    searches_per_session: float = 1.8  # mean searches per session (>= 1)
    taste_strength: float = 1.5  # franchise/genre taste
    edition_strength: float = 1.0  # standard vs limited/collector's (price tier)
    price_strength: float = 1.0  # price sensitivity
    region_strength: float = 0.6  # regional popularity skew
    regions: int = 4
    noise: float = 0.3  # idiosyncratic taste (unknown even to the oracle)
    query_taste_bias: float = 1.0  # how much taste tilts which queries a shopper types
    min_query_clicks: int = 5  # a query text is used when this many training clicks followed it
    floor: float = 0.02  # base relevance of a product the query's clicks never reached
    top_attractiveness: float = 0.7  # click probability of the shopper's best product, looked at
    desktop_patience: float = 0.85  # probability of looking one position further (desktop)
    mobile_patience: float = 0.6  # same on a phone: position bias is stronger
    mobile_share: float = 0.5
    continue_after_click: float = 0.4
    cart_rate: float = 0.35
    purchase_rate: float = 0.6
    premium_share: float = 0.3  # shoppers who prefer limited/collector's editions

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v < 0:
                raise ValueError(f"{f.name} must be >= 0, got {v}")
        for name in (
            "desktop_patience",
            "mobile_patience",
            "mobile_share",
            "continue_after_click",
            "cart_rate",
            "purchase_rate",
            "premium_share",
            "top_attractiveness",
        ):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if self.shoppers < 1 or self.days < 1 or self.regions < 1 or self.searches_per_session < 1:
            raise ValueError("shoppers, days, regions and searches_per_session must be >= 1")

    def strengths(self, only: Sequence[str] | None = None) -> dict[str, float]:
        """Each dimension's strength; ``only``: the others zeroed."""
        s = {d: getattr(self, f"{d}_strength") for d in DIMENSIONS}
        return s if only is None else {d: (v if d in only else 0.0) for d, v in s.items()}

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Shopper:
    user_id: str
    liked: frozenset[int]  # taste groups
    edition: float  # +1 prefers limited/collector's, -1 standard
    sensitivity: float  # in [-1, 1]: > 0 shuns expensive products
    region: int
    mobile: bool
    activity: float

    @property
    def location(self) -> str:
        return f"region-{self.region}"

    @property
    def device(self) -> str:
        return "mobile" if self.mobile else "desktop"


@dataclass(frozen=True)
class SimSearch:
    query_id: str
    shopper: int  # index into World.shoppers
    session_id: str
    text: str
    key: str  # normalized query key
    time: datetime
    day: int


@dataclass(frozen=True)
class Interaction:
    kind: str  # click, add_to_cart, purchase
    product_id: str
    position: int  # 1-based
    time: datetime
    price: float | None


class World:
    """The simulated shop (see the module docstring)."""

    def __init__(
        self, params: SimParams, catalog: Mapping[str, CatalogProduct], train: Sequence[SearchRow]
    ) -> None:
        self.params = params
        self.product_ids = list(catalog)
        self.column = {p: i for i, p in enumerate(self.product_ids)}
        products = [catalog[p] for p in self.product_ids]
        rng = np.random.default_rng((params.seed, 1))
        self.prices = np.array([p.price or 0.0 for p in products], dtype=np.float64)
        self.group, self.group_names = _groups(products)
        self.premium = _premium(products, self.prices)
        logp = np.log(np.maximum(self.prices, 1.0))
        self.zprice = (logp - logp.mean()) / (logp.std() + 1e-9)
        self.skew = rng.normal(0.0, 1.0, size=(params.regions, len(products)))
        self.keys, self.texts, self.rel, self.freq = _queries(train, self.column, params)
        self.shoppers = [self._shopper(i, rng) for i in range(params.shoppers)]
        self.noise = rng.normal(0.0, params.noise, size=(params.shoppers, len(products)))

    # --- shoppers and their searches -----------------------------------------------------------

    def _shopper(self, i: int, rng: np.random.Generator) -> Shopper:
        n_groups = len(self.group_names)
        sizes = np.bincount(self.group, minlength=n_groups).astype(np.float64)
        k = int(rng.integers(1, 4))
        liked = rng.choice(
            n_groups, size=min(k, n_groups), replace=False, p=np.sqrt(sizes) / np.sqrt(sizes).sum()
        )
        p = self.params
        return Shopper(
            user_id=f"sim-{p.seed}-{i:05d}",
            liked=frozenset(int(g) for g in liked),
            edition=1.0 if rng.random() < p.premium_share else -1.0,
            sensitivity=float(rng.uniform(-1.0, 1.0)),
            region=int(rng.integers(p.regions)),
            mobile=bool(rng.random() < p.mobile_share),
            activity=float(rng.gamma(2.0, 0.5)),
        )

    def pref(self, shopper: int, strengths: Mapping[str, float] | None = None) -> np.ndarray:
        """log preference multiplier over the catalog (no noise), per dimension's strength."""
        s = strengths if strengths is not None else self.params.strengths()
        u = self.shoppers[shopper]
        liked = np.isin(self.group, list(u.liked)).astype(np.float64)
        return (
            s["taste"] * liked
            + s["edition"] * u.edition * self.premium
            - s["price"] * u.sensitivity * self.zprice
            + s["region"] * self.skew[u.region]
        )

    def attractiveness(self, shopper: int, key: str) -> np.ndarray:
        """The true click probability of each product once looked at (with the unknown noise)."""
        raw = self.rel[self.keys[key]] * np.exp(self.pref(shopper) + self.noise[shopper])
        return self.params.top_attractiveness * raw / raw.max()

    def oracle(self, shopper: int, key: str, only: Sequence[str] | None = None) -> np.ndarray:
        """What the oracle ranks by: base relevance and the shopper's preferences (``only``: those
        dimensions), not the noise."""
        return self.rel[self.keys[key]] * np.exp(self.pref(shopper, self.params.strengths(only)))

    def population(self, key: str) -> np.ndarray:
        return self.rel[self.keys[key]].copy()

    def schedule(self, start: datetime) -> list[SimSearch]:
        """Every search of the simulation, in time order."""
        p = self.params
        rng = np.random.default_rng((p.seed, 2))
        base = self.freq**0.5
        group_share = np.zeros((len(self.keys), len(self.group_names)))
        for g in range(len(self.group_names)):
            group_share[:, g] = self.rel_share[:, self.group == g].sum(axis=1)
        out: list[SimSearch] = []
        for i, u in enumerate(self.shoppers):
            tilt = group_share[:, list(u.liked)].sum(axis=1)
            weights = base * np.exp(p.query_taste_bias * tilt * 3.0)
            weights /= weights.sum()
            n_session = 0
            for day in range(p.days):
                for _ in range(rng.poisson(p.visits_per_day * u.activity)):
                    at = start + timedelta(days=day, hours=float(rng.uniform(8.0, 23.0)))
                    n = int(rng.geometric(1.0 / p.searches_per_session))  # mean searches_per_session
                    sid = f"{u.user_id}-s{n_session}"
                    n_session += 1
                    for j in range(n):
                        q = int(rng.choice(len(self.keys), p=weights))
                        key = self.key_list[q]
                        out.append(
                            SimSearch(
                                query_id=f"{sid}-q{j}",
                                shopper=i,
                                session_id=sid,
                                text=self.texts[key],
                                key=key,
                                time=at,
                                day=day,
                            )
                        )
                        at += timedelta(seconds=float(rng.uniform(30.0, 300.0)))
        out.sort(key=lambda s: (s.time, s.query_id))
        return out

    @property
    def key_list(self) -> list[str]:
        return list(self.keys)

    @property
    def rel_share(self) -> np.ndarray:
        """Each query's clicks as shares (rows sum to 1 over the clicked products)."""
        clicked = np.where(self.rel > self.params.floor, self.rel, 0.0)
        return clicked / np.maximum(clicked.sum(axis=1, keepdims=True), 1e-12)

    # --- answering a served list ---------------------------------------------------------------

    def respond(self, search: SimSearch, served: Sequence[str], seed: int) -> list[Interaction]:
        """The shopper's clicks, add-to-carts and purchases on the list served to ``search``."""
        p = self.params
        u = self.shoppers[search.shopper]
        rng = np.random.default_rng((p.seed, 3, seed))
        attr = self.attractiveness(search.shopper, search.key)
        patience = p.mobile_patience if u.mobile else p.desktop_patience
        out: list[Interaction] = []
        at = search.time
        for k, pid in enumerate(served):
            if k > 0 and rng.random() >= patience:
                break
            col = self.column.get(pid)
            if col is None or rng.random() >= attr[col]:
                continue
            at += timedelta(seconds=5.0 + 3.0 * k)
            price = float(self.prices[col]) or None
            out.append(Interaction("click", pid, k + 1, at, price))
            cart = p.cart_rate * math.exp(-0.5 * p.price_strength * u.sensitivity * float(self.zprice[col]))
            if rng.random() < min(1.0, cart):
                at += timedelta(seconds=20.0)
                out.append(Interaction("add_to_cart", pid, k + 1, at, price))
                if price and rng.random() < p.purchase_rate:
                    at += timedelta(seconds=60.0)
                    out.append(Interaction("purchase", pid, k + 1, at, price))
            if rng.random() >= p.continue_after_click:
                break
        return out


# --- measuring ---------------------------------------------------------------------------------


def ndcg_at(order: Sequence[int] | np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """NDCG@k of a ranking (catalog columns, best first) against linear gains (true attractiveness)."""
    top = np.asarray(order[:k], dtype=np.int64)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((gains[top] * discount[: len(top)]).sum())
    ideal = float((np.sort(gains)[::-1][:k] * discount[: min(k, len(gains))]).sum())
    return dcg / ideal if ideal > 0 else 0.0


def ranking(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Columns best first; ties in a fixed random order."""
    tie = np.random.default_rng(seed).random(len(scores))
    return np.lexsort((tie, -scores))


# --- the catalog's taste groups, premium flag and queries ---------------------------------------


def _franchise(title: str) -> str:
    head = re.split(r"[:\-(]", title, maxsplit=1)[0]
    w = [x for x in words(head) if x not in ("the", "a", "tom", "clancys", "sids")]
    return " ".join(w[:2])


def _groups(products: Sequence[CatalogProduct]) -> tuple[np.ndarray, list[str]]:
    """Each product's taste group: its franchise (first words of the title) when 3+ products share
    it, else its publisher (brand), else its leaf category."""
    fr = [_franchise(p.title) for p in products]
    counts = Counter(fr)
    names = [
        f if counts[f] >= 3 and f else (p.brand or (p.category_path or ["other"])[-1])
        for f, p in zip(fr, products, strict=True)
    ]
    index: dict[str, int] = {}
    return np.array([index.setdefault(n, len(index)) for n in names], dtype=np.int64), list(index)


def _premium(products: Sequence[CatalogProduct], prices: np.ndarray) -> np.ndarray:
    """1 for a limited/collector's/premium edition: by its title, or priced over 1.5x its leaf
    category's median."""
    leaf = [(p.category_path or ["-"])[-1] for p in products]
    by_leaf: dict[str, list[float]] = defaultdict(list)
    for lf, price in zip(leaf, prices, strict=True):
        if price > 0:
            by_leaf[lf].append(price)
    median = {lf: float(np.median(v)) for lf, v in by_leaf.items()}
    return np.array(
        [
            1.0 if _PREMIUM.search(p.title) or (price > 1.5 * median.get(lf, math.inf)) else 0.0
            for p, lf, price in zip(products, leaf, prices, strict=True)
        ]
    )


def _queries(
    train: Sequence[SearchRow], column: Mapping[str, int], params: SimParams
) -> tuple[dict[str, int], dict[str, str], np.ndarray, np.ndarray]:
    """Query keys with enough training clicks: their row, the most typed text, base relevance
    [queries, products] (clicks over the top product's, at least ``floor``), click counts."""
    clicks: dict[str, Counter[int]] = defaultdict(Counter)
    typed: dict[str, Counter[str]] = defaultdict(Counter)
    for r in train:
        col = column.get(r.product_id or "")
        if col is None:
            continue
        key = normalize_query(r.query)
        if not key:
            continue
        clicks[key][col] += 1
        typed[key][r.query.strip()] += 1
    keys = sorted(k for k, c in clicks.items() if sum(c.values()) >= params.min_query_clicks)
    if not keys:
        raise ValueError(f"no query has {params.min_query_clicks} training clicks")
    rel = np.zeros((len(keys), len(column)))
    for i, k in enumerate(keys):
        for col, n in clicks[k].items():
            rel[i, col] = n
    freq = rel.sum(axis=1)
    rel = np.maximum(rel / rel.max(axis=1, keepdims=True), params.floor)
    return ({k: i for i, k in enumerate(keys)}, {k: typed[k].most_common(1)[0][0] for k in keys}, rel, freq)
