"""The one read path: scorer (online, Redis) and trainer (offline, memory) call the same function.

    store = MemoryStore(settings.features)          # or RedisStore(connect(settings.redis), ...)
    for event in history_in_time_order: store.apply(event)
    results = read_batch(store, [Request.for_text(user_id, text, candidates)], now)
    results[0].features            # float32 [len(candidates), len(FEATURE_NAMES)]
    results[0].recent_products     # the shopper's recent products, strongest first
    results[0].recent_weights      # float32 weights (kind x recency as of ``now``)

Decayed values are read as of ``now`` (event-time seconds). Unknown shoppers, products and queries
read as cold-start defaults (zeros, ``user_has_history`` 0), never as errors. A shopper whose last
activity is older than ``user_ttl_s`` reads as unknown, offline exactly as online. A query, or
a query word, that no click has followed yet reads the evidence of its respelling from the
store's :meth:`~features.store.FeatureStore.speller` ("kimect sports" that of "kinect sports").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from core.events import QueryContext
from core.settings import FeatureSettings
from core.text import normalize_query, query_key, query_words
from features import catalog, decay, item, query_item, user
from features.store import FeatureStore, Snapshot
from features.user import UserState

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "user_category_affinity",  # share of the shopper's decayed attention on the candidate's category
    # (attention and price level shrunk by FeatureSettings.preference_prior_weight)
    "user_brand_affinity",  # same for its brand
    "price_ratio_log",  # log(price / category typical) - the shopper's price level (user.price_level)
    "price_level_cross",  # log(price / category typical) x the shopper's price level: > 0 when the
    # candidate sits on the side of typical the shopper shops on (a product the head need not learn)
    "user_activity_log",  # log1p(clicks + add-to-carts + purchases)
    "user_searches_log",  # log1p(searches)
    "hours_since_seen_log",  # log1p(hours since the shopper's last event)
    "user_has_history",  # 1 when the shopper is known
    "user_item_interest",  # the shopper's own decayed, kind-weighted interactions with the candidate
    "item_clicks_log",  # log1p(decayed clicks)
    "item_carts_log",  # log1p(decayed add-to-carts)
    "item_purchases_log",  # log1p(decayed purchases)
    "item_impressions_log",  # log1p(decayed impressions)
    "item_ctr",  # decayed clicks / decayed impressions, smoothed toward ctr_prior
    "item_age_days_log",  # log1p(days since the catalog first listed it)
    "item_release_days_log",  # sign(d) log1p(|d|), d = days since release (< 0: a pre-order), or
    # since the catalog first listed it when no release date is given
    "item_idle_hours_log",  # log1p(hours since its last interaction)
    "item_price_log",  # log1p(catalog price)
    "query_item_clicks_log",  # log1p(decayed clicks on the candidate after this query text)
    "query_item_purchases_log",  # log1p(decayed purchases after this query text)
    "query_item_click_share",  # the candidate's share of this query's decayed clicks
    "query_clicks_log",  # log1p(decayed clicks after this query text): how much the share says
    "query_item_idle_hours_log",  # log1p(hours since this query text last led to the candidate)
    "query_item_burst_share",  # its share of this query's clicks, decayed with the short half-life
    "query_word_share_mean",  # the candidate's share of each query word's decayed clicks, mean over words
    "query_word_share_min",  # ... the least of them: every word led to the candidate
    "query_word_share_max",  # ... the most of them: some word did
    "query_words_log",  # log1p(number of query words): how far apart mean, min and max can be
    "context_location_lift",  # log(the candidate's share of the search's location's decayed clicks,
    # pulled toward its share of all located clicks by context_prior_clicks, over the latter)
    "context_location_clicks_log",  # log1p(decayed clicks from the search's location): what the lift says
    "context_device_lift",  # the same for the search's device
    "context_device_clicks_log",
    "position",  # the candidate's original position when given, else 0
)
INDEX: Final = {name: i for i, name in enumerate(FEATURE_NAMES)}


def feature_schema(names: Sequence[str]) -> str:
    """The name of a feature layout, carried with served values (``ServedFeatures.schema``): who
    reads them later (the joiner, the trainer) knows which columns they are, or that they differ."""
    return f"f{len(names)}-{hashlib.sha256(','.join(names).encode()).hexdigest()[:12]}"


FEATURE_SCHEMA: Final = feature_schema(FEATURE_NAMES)
# The columns that depend only on the product (and the time of reading), see _item_columns.
ITEM_COLUMNS: Final = [INDEX[n] for n in FEATURE_NAMES if n.startswith("item_")]


@dataclass(frozen=True)
class Request:
    """One query to featurize: ``query`` is normalized text (core.text.normalize_query), "" if none;
    ``words`` its core.text.query_words; ``context`` where and on what it was made."""

    user_id: str
    query: str
    candidates: Sequence[str]
    positions: Sequence[int] | None = None
    words: Sequence[str] = ()
    context: QueryContext | None = None

    @classmethod
    def for_text(cls, user_id: str, text: str, candidates: Sequence[str],
                 positions: Sequence[int] | None = None, context: QueryContext | None = None) -> Request:
        """The request for a query as the shopper typed it: its key and its words."""
        return cls(user_id, normalize_query(text), candidates, positions, query_words(text), context)


@dataclass(frozen=True)
class Result:
    features: np.ndarray  # float32 [n_candidates, len(FEATURE_NAMES)]
    recent_products: tuple[str, ...]
    recent_weights: np.ndarray  # float32 [len(recent_products)]


def read_batch(store: FeatureStore, requests: Sequence[Request], now: float) -> list[Result]:
    """Features for many requests from one snapshot (one Redis round trip)."""
    speller = store.speller()
    respelled = [speller.respell_all(r.words) if r.query else r.words for r in requests]
    evidence: dict[str, Sequence[str]] = {}  # text -> the candidates its evidence is read for
    for r, rs in zip(requests, respelled, strict=True):
        for text in _evidence_keys(r, rs):
            known = evidence.get(text)
            if known is None:
                evidence[text] = r.candidates
            elif known is not r.candidates:  # two requests of the batch share the text
                evidence[text] = list(dict.fromkeys([*known, *r.candidates]))
    products = list(dict.fromkeys(requests[0].candidates if len(requests) == 1
                                  else (pid for r in requests for pid in r.candidates)))
    snap = store.snapshot((r.user_id for r in requests), products, evidence)
    items = _ItemRows(products, snap, now, store.config)
    return [_featurize(r, rs, snap, now, store.config, items)
            for r, rs in zip(requests, respelled, strict=True)]


def _evidence_keys(r: Request, respelled: Sequence[str]) -> list[str]:
    """The query-product evidence a request reads: its query's, then each of its words', then
    those of its respelling (:mod:`features.speller`), which stand in where the typed ones have none;
    and its context's (:func:`features.query_item.context_keys`), text or not."""
    context = list(query_item.context_keys(r.context))
    if not r.query:
        return context
    typed = [r.query, *(query_item.word_key(w) for w in r.words), *context]
    if tuple(respelled) == tuple(r.words):
        return typed
    fixed = [w for w, typed_w in zip(respelled, r.words, strict=True) if w != typed_w]
    return [*typed, query_key(respelled), *(query_item.word_key(w) for w in fixed)]


class _ItemRows:
    """The item columns of every product of a batch, computed at once: requests of one batch share
    most of their candidates, and the item columns depend only on the product and ``now``."""

    def __init__(self, products: list[str], snap: Snapshot, now: float, cfg: FeatureSettings) -> None:
        self.products = products
        self.rows = _item_columns(products, snap, now, cfg)
        self._index: dict[str, int] | None = None

    def block(self, candidates: Sequence[str]) -> np.ndarray:
        """The item columns (``ITEM_COLUMNS`` order) of ``candidates``, one row each."""
        if len(candidates) == len(self.products) and list(candidates) == self.products:
            return self.rows  # one request in the batch (or all with the same candidates)
        if self._index is None:
            self._index = {pid: i for i, pid in enumerate(self.products)}
        index = self._index
        rows = np.fromiter((index[pid] for pid in candidates), dtype=np.intp, count=len(candidates))
        return self.rows[rows]


def _featurize(req: Request, respelled: Sequence[str], snap: Snapshot, now: float, cfg: FeatureSettings,
               items: _ItemRows) -> Result:
    state = snap.users.get(req.user_id)
    if state is not None and not user.is_live(state, now, cfg):
        state = None
    out = np.zeros((len(req.candidates), len(FEATURE_NAMES)), dtype=np.float32)
    out[:, ITEM_COLUMNS] = items.block(req.candidates)
    interest = user.interest(state, now, cfg) if state is not None else {}
    if state is not None:
        _user_columns(out, state, now)
    key = req.query
    if key and key not in snap.query_totals:  # no click followed the query as typed: its respelling's
        key = query_key(respelled)
    totals = snap.query_totals.get(key) if key else None
    q_clicks, q_burst = _clicks(totals, now, cfg), _burst(totals, now, cfg)
    if key:
        out[:, INDEX["query_clicks_log"]] = math.log1p(q_clicks)
    if state is not None:
        _user_item_columns(out, req.candidates, state, snap, interest, cfg.preference_prior_weight)
    if key and key in snap.evidence:
        st, there = snap.evidence[key].take(req.candidates)
        if there.any():
            _query_columns(out, st, there, q_clicks, q_burst, now, cfg)
    if req.query and req.words:
        _word_columns(out, req, respelled, snap, now, cfg)
    if req.context is not None:
        _context_columns(out, req.candidates, req.context, snap, now, cfg)
    if req.positions is not None:
        out[:, INDEX["position"]] = np.asarray(req.positions, dtype=np.float32)
    ranked = sorted(interest.items(), key=lambda kv: (-kv[1], kv[0]))
    return Result(
        out,
        tuple(pid for pid, _ in ranked),
        np.asarray([w for _, w in ranked], dtype=np.float32),
    )


def _user_columns(out: np.ndarray, s: UserState, now: float) -> None:
    out[:, INDEX["user_activity_log"]] = math.log1p(s.n_clicks + s.n_carts + s.n_purchases)
    out[:, INDEX["user_searches_log"]] = math.log1p(s.n_searches)
    out[:, INDEX["hours_since_seen_log"]] = math.log1p(max(0.0, now - s.last_seen) / 3600.0)
    out[:, INDEX["user_has_history"]] = 1.0


def _user_item_columns(out: np.ndarray, candidates: Sequence[str], s: UserState, snap: Snapshot,
                       interest: dict[str, float], prior: float) -> None:
    """The shopper-and-candidate columns, built as lists and written a column at a time; the
    affinities and the price level shrunk by the ``prior`` weight (user.price_level)."""
    n = len(candidates)
    interests, categories, brands, prices, crosses = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    category_total, brand_total = sum(s.categories.values()), sum(s.brands.values())
    level = user.price_level(s, prior)
    typical: dict[str, float | None] = {}
    for j, pid in enumerate(candidates):
        interests[j] = interest.get(pid, 0.0)
        attrs = snap.products.get(pid)
        if attrs is None:
            continue
        categories[j] = user.affinity_share(s.categories, attrs.category, category_total, prior)
        brands[j] = user.affinity_share(s.brands, attrs.brand, brand_total, prior)
        if level is None or attrs.category is None or not attrs.price or attrs.price <= 0:
            continue
        if attrs.category not in typical:
            prices_of = snap.category_prices.get(attrs.category)
            typical[attrs.category] = catalog.typical_price(*prices_of) if prices_of else None
        if t := typical[attrs.category]:
            ratio = math.log(attrs.price / t)
            prices[j], crosses[j] = ratio - level, ratio * level
    out[:, INDEX["user_item_interest"]] = interests
    out[:, INDEX["user_category_affinity"]] = categories
    out[:, INDEX["user_brand_affinity"]] = brands
    out[:, INDEX["price_ratio_log"]] = prices
    out[:, INDEX["price_level_cross"]] = crosses


def _item_columns(products: Sequence[str], snap: Snapshot, now: float, cfg: FeatureSettings) -> np.ndarray:
    """The item columns of ``products``: float32 [len(products), len(ITEM_COLUMNS)], computed as
    arrays (this runs for every distinct candidate of every batch)."""
    n = len(products)
    st, _ = snap.item_rows.take(products)  # zeros, item.EMPTY, where a product has none
    get = snap.products.get
    # (known, first seen, price, released) per product, in one pass; unknown ones read 0 (``where``)
    static = np.array([(1.0, a.first_seen, a.price or 0.0, a.first_seen if a.released is None else a.released)
                       if (a := get(pid)) is not None else (0.0, now, 0.0, now) for pid in products],
                      dtype=np.float64).reshape(n, 4)
    known, first_seen, price, released = static[:, 0] > 0, static[:, 1], static[:, 2], static[:, 3]
    days = (now - released) / 86400.0
    decayed = decay.values_at(st[:, [item.CLICKS, item.CARTS, item.PURCHASES, item.IMPRESSIONS]],
                              st[:, item.T], now, cfg.item_half_life_s)
    last = st[:, item.LAST]
    columns = {
        "item_clicks_log": np.log1p(decayed[:, 0]),
        "item_carts_log": np.log1p(decayed[:, 1]),
        "item_purchases_log": np.log1p(decayed[:, 2]),
        "item_impressions_log": np.log1p(decayed[:, 3]),
        "item_ctr": item.ctr(st[:, item.CLICKS], st[:, item.IMPRESSIONS], cfg.ctr_prior,
                             cfg.ctr_prior_strength),
        "item_age_days_log": np.where(known, np.log1p(np.maximum(0.0, now - first_seen) / 86400.0), 0.0),
        "item_release_days_log": np.where(known, np.copysign(np.log1p(np.abs(days)), days), 0.0),
        "item_idle_hours_log": np.where(last > 0, np.log1p(np.maximum(0.0, now - last) / 3600.0), 0.0),
        "item_price_log": np.where(known, np.log1p(price), 0.0),
    }
    out = np.empty((n, len(ITEM_COLUMNS)), dtype=np.float32)
    for j, col in enumerate(ITEM_COLUMNS):
        out[:, j] = columns[FEATURE_NAMES[col]]
    return out


def _clicks(st: tuple[float, ...] | None, now: float, cfg: FeatureSettings) -> float:
    """Decayed clicks of a query-product state or a query's totals (0 when there is none)."""
    if st is None:
        return 0.0
    return decay.value_at(st[query_item.CLICKS], st[query_item.T], now, cfg.query_half_life_s)


def _burst(st: tuple[float, ...] | None, now: float, cfg: FeatureSettings) -> float:
    """The same clicks, decayed with the short half-life."""
    if st is None:
        return 0.0
    h = cfg.query_burst_half_life_s
    return decay.value_at(st[query_item.BURST_CLICKS], st[query_item.T_BURST], now, h)


def _query_columns(
    out: np.ndarray, st: np.ndarray, there: np.ndarray, q_clicks: float, q_burst: float, now: float,
    cfg: FeatureSettings,
) -> None:
    """The query-and-candidate columns of the candidates the query led to (``there``), from their
    states ``st`` [n, query_item.SIZE]; the others keep zeros."""
    h, t_ref = cfg.query_half_life_s, st[:, query_item.T]
    clicks = _decayed(st[:, query_item.CLICKS], t_ref, now, h)
    purchases = _decayed(st[:, query_item.PURCHASES], t_ref, now, h)
    columns = {
        "query_item_clicks_log": np.log1p(clicks),
        "query_item_purchases_log": np.log1p(purchases),
        "query_item_click_share": clicks / q_clicks if q_clicks > 0 else np.zeros_like(clicks),
        # t_ref of a pair is its latest event: with a half-life long enough to remember rare queries,
        # this says whether the query still leads to the product (a game replaced by its sequel).
        "query_item_idle_hours_log": np.log1p(np.maximum(0.0, now - t_ref) / 3600.0),
    }
    if q_burst > 0:
        burst = _decayed(st[:, query_item.BURST_CLICKS], st[:, query_item.T_BURST], now,
                         cfg.query_burst_half_life_s)
        columns["query_item_burst_share"] = burst / q_burst
    for name, values in columns.items():
        out[:, INDEX[name]] = np.where(there, values, 0.0)


def _decayed(values: np.ndarray, t_ref: np.ndarray, now: float, half_life: float) -> np.ndarray:
    """:func:`features.decay.value_at` element by element."""
    return values * 2.0 ** (-np.maximum(now - t_ref, 0.0) / half_life)


def _evidence_clicks(snap: Snapshot, key: str, candidates: Sequence[str], now: float,
                     cfg: FeatureSettings) -> np.ndarray | None:
    """The candidates' decayed clicks after ``key`` (a query word, a search context), 0 for those
    it never led to; None when it led to none of them."""
    rows = snap.evidence.get(key)
    if rows is None:
        return None
    st, there = rows.take(candidates)
    if not there.any():
        return None
    clicks = _decayed(st[:, query_item.CLICKS], st[:, query_item.T], now, cfg.query_half_life_s)
    return np.where(there, clicks, 0.0)


def _word_columns(out: np.ndarray, req: Request, respelled: Sequence[str], snap: Snapshot, now: float,
                  cfg: FeatureSettings) -> None:
    shares = np.zeros((len(req.words), len(req.candidates)), dtype=np.float32)
    for i, (word, fixed) in enumerate(zip(req.words, respelled, strict=True)):
        key = query_item.word_key(word)
        total = _clicks(snap.query_totals.get(key), now, cfg)
        if total <= 0 and fixed != word:  # no click followed the word as typed: its respelling's
            key = query_item.word_key(fixed)
            total = _clicks(snap.query_totals.get(key), now, cfg)
        if total > 0 and (clicks := _evidence_clicks(snap, key, req.candidates, now, cfg)) is not None:
            shares[i] = clicks / total
    out[:, INDEX["query_word_share_mean"]] = shares.mean(axis=0)
    out[:, INDEX["query_word_share_min"]] = shares.min(axis=0)
    out[:, INDEX["query_word_share_max"]] = shares.max(axis=0)
    out[:, INDEX["query_words_log"]] = math.log1p(len(req.words))


def _context_columns(out: np.ndarray, candidates: Sequence[str], context: QueryContext, snap: Snapshot,
                     now: float, cfg: FeatureSettings) -> None:
    """Per context dimension the search names: how much more (lift > 0) or less the candidate is
    clicked from there than from everywhere located, and how many clicks that rests on."""
    prior = cfg.context_prior_clicks
    for dim, label in query_item.context_labels(context):
        every, here = query_item.context_key(dim), query_item.context_key(dim, label)
        clicks_here = _clicks(snap.query_totals.get(here), now, cfg)
        out[:, INDEX[f"context_{dim}_clicks_log"]] = math.log1p(clicks_here)
        clicks_every = _clicks(snap.query_totals.get(every), now, cfg)
        if clicks_every <= 0 or (everywhere := _evidence_clicks(snap, every, candidates, now, cfg)) is None:
            continue  # no candidate clicked from anywhere: no lift
        share = everywhere / clicks_every
        ours = _evidence_clicks(snap, here, candidates, now, cfg)
        if ours is None:
            ours = np.zeros(len(candidates))
        pulled = (ours + prior * share) / (clicks_here + prior)  # > 0 wherever share is
        ratio = np.divide(pulled, share, out=np.ones_like(share), where=share > 0)  # no share: 0
        out[:, INDEX[f"context_{dim}_lift"]] = np.log(ratio)
