"""The pure update rules, without any store: event in, state out, event time only."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from core.events import AddToCart, CatalogProduct, Click, Purchase, Query, QueryContext
from core.settings import FeatureSettings
from features import catalog, decay, item, query_item, user
from features.catalog import ProductAttrs
from features.speller import Speller

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CFG = FeatureSettings(recent_n=3, affinity_top_k=2)
DAY = 86400.0


def click(i: int, pid: str = "p1", at: datetime = T0, kind: type = Click, **kw: object) -> Click:
    extra = {"order_id": "o1", "price": 10.0} if kind is Purchase else {}
    return kind(event_id=f"e{i}", user_id="u1", session_id="s", product_id=pid, timestamp=at,
                **(extra | kw))


def attrs(category: str = "tv", brand: str | None = "acme", price: float | None = 100.0) -> ProductAttrs:
    return ProductAttrs(category, brand, price, 0.0, 0.0)


def test_decay_halves_per_half_life_and_ignores_arrival_order() -> None:
    a, t = decay.add([0.0], 0.0, 0, 1.0, 100.0, 10.0)
    a, t = decay.add(a, t, 0, 1.0, 110.0, 10.0)
    assert t == 110.0 and a[0] == pytest.approx(1.5)
    b, u = decay.add([0.0], 0.0, 0, 1.0, 110.0, 10.0)
    b, u = decay.add(b, u, 0, 1.0, 100.0, 10.0)  # late event: discounted, t_ref stays
    assert (b[0], u) == (pytest.approx(1.5), 110.0)
    assert decay.value_at(1.5, 110.0, 130.0, 10.0) == pytest.approx(0.375)
    assert decay.value_at(1.5, 110.0, 100.0, 10.0) == 1.5  # nothing is un-applied
    # the array form (the read path's, for a batch's products) gives the very same doubles
    values, t_ref = np.array([[1.5, 0.25], [3.0, 7.0], [0.0, 1.0]]), np.array([110.0, 95.5, 130.0])
    expected = [[decay.value_at(v, t, 117.3, 10.0) for v in row]
                for row, t in zip(values.tolist(), t_ref.tolist(), strict=True)]
    assert decay.values_at(values, t_ref, 117.3, 10.0).tolist() == expected


def test_interactions_count_weigh_and_decay_affinities() -> None:
    s = user.on_interaction(None, click(1), attrs(), None, CFG)
    s = user.on_interaction(s, click(2, at=T0 + timedelta(days=14), kind=AddToCart),
                            attrs("phone", "zed"), None, CFG)
    assert (s.n_clicks, s.n_carts, s.n_purchases) == (1, 1, 0)
    assert s.first_seen == T0.timestamp() and s.last_seen == (T0 + timedelta(days=14)).timestamp()
    # One half-life later the click (weight 1) counts 0.5 against the add-to-cart's 3.
    assert s.categories == {"tv": pytest.approx(0.5), "phone": pytest.approx(3.0)}
    assert user.affinity_share(s.categories, "phone") == pytest.approx(3 / 3.5)
    assert user.affinity_share(s.categories, "nothing") == 0.0


def test_recent_is_bounded_time_ordered_and_affinities_keep_top_k() -> None:
    s = None
    for i, (cat, minutes) in enumerate([("a", 0), ("b", 5), ("c", 1), ("d", 9)]):
        s = user.on_interaction(s, click(i, f"p{i}", T0 + timedelta(minutes=minutes)), attrs(cat), None, CFG)
    assert s is not None
    assert [r.product_id for r in s.recent] == ["p2", "p1", "p3"]  # newest 3 by event time
    assert len(s.categories) == 2 and "d" in s.categories


def test_price_level_is_kind_weighted_price_against_category_typical() -> None:
    s = user.on_interaction(None, click(1, kind=Purchase, price=150.0), attrs(), 100.0, CFG)
    assert user.price_level(s) == pytest.approx(math.log(1.5))
    # A click counts at the catalog's price when it names none, weighted 1 against a purchase's 5.
    s = user.on_interaction(s, click(2), attrs(price=50.0), 100.0, CFG)
    w = CFG.purchase_weight
    assert user.price_level(s) == pytest.approx((w * math.log(1.5) + math.log(0.5)) / (w + 1), rel=1e-6)
    assert user.price_level(user.on_interaction(None, click(2), attrs(price=None), 100.0, CFG)) is None
    assert user.price_level(user.on_interaction(None, click(2), attrs(), None, CFG)) is None


def test_the_prior_weight_shrinks_a_thin_history_toward_no_preference() -> None:
    """With ``prior_weight`` the level and the shares read as if that much weight of typical-priced
    attention spread elsewhere came with the shopper's own: one purchase is a lean, many approach
    the raw figures."""
    one = user.on_interaction(None, click(1, kind=Purchase, price=150.0), attrs(), 100.0, CFG)
    w = CFG.purchase_weight
    assert user.price_level(one, 10.0) == pytest.approx(w * math.log(1.5) / (w + 10.0))
    assert user.affinity_share(one.categories, "tv", prior_weight=10.0) == pytest.approx(w / (w + 10.0))
    many = one
    for i in range(2, 60):
        many = user.on_interaction(many, click(i, kind=Purchase, price=150.0), attrs(), 100.0, CFG)
    assert user.price_level(one, 10.0) < user.price_level(many, 10.0) < user.price_level(many)
    assert user.price_level(many, 10.0) == pytest.approx(math.log(1.5), rel=0.05)
    assert user.affinity_share(many.categories, "tv", prior_weight=10.0) == pytest.approx(1.0, rel=0.05)


def test_idle_shopper_expires_in_event_time() -> None:
    s = user.on_interaction(None, click(1), attrs(), None, CFG)
    later = T0 + timedelta(seconds=CFG.user_ttl_s + 1)
    s2 = user.on_interaction(s, click(2, at=later), attrs(), None, CFG)
    assert s2.n_clicks == 1 and s2.first_seen == later.timestamp()


def test_query_sets_last_known_location_and_device_by_event_time() -> None:
    def q(i: int, at: datetime, loc: str | None) -> Query:
        return Query(query_id=f"q{i}", user_id="u1", session_id="s", text="tv", timestamp=at,
                      context=QueryContext(location=loc, device="mobile"))

    s = user.on_query(None, q(1, T0 + timedelta(hours=1), "US-NY"), CFG)
    s = user.on_query(s, q(2, T0, "US-CA"), CFG)  # older: does not overwrite
    s = user.on_query(s, q(3, T0 + timedelta(hours=2), None), CFG)  # no location: keeps the last
    assert (s.location, s.device, s.n_searches) == ("US-NY", "mobile", 3)


def test_user_state_round_trips_and_stays_small() -> None:
    cfg = FeatureSettings()
    s = None
    for i in range(100):
        s = user.on_interaction(s, click(i, f"sku{1000000 + i}", T0 + timedelta(minutes=i),
                                         kind=(Click, AddToCart, Purchase)[i % 3], price=20.0 + i),
                                attrs(f"abcat{i % 20:07d}", f"brand {i % 13}"), 60.0, cfg)
    assert s is not None
    data = user.encode(s)
    assert user.decode(data) == s
    assert len(data) < 900  # full recent list and affinities: the 1 KB aim includes Redis overhead


def test_catalog_ignores_stale_versions_and_tracks_category_prices() -> None:
    def product(price: float, at: datetime, cat: str = "tv") -> CatalogProduct:
        return CatalogProduct(product_id="p1", title="t", brand=" ACME ", category_path=["e", cat],
                              price=price, updated_at=at)

    a = catalog.on_product(None, product(100.0, T0))
    assert a is not None and (a.category, a.brand) == ("tv", "acme")
    assert catalog.price_deltas(None, a) == {"tv": (1, 10000)}
    b = catalog.on_product(a, product(120.0, T0 + timedelta(days=1), "phone"))
    assert b is not None and b.first_seen == a.first_seen
    assert catalog.price_deltas(a, b) == {"tv": (-1, -10000), "phone": (1, 12000)}
    assert catalog.on_product(b, product(90.0, T0)) is None
    assert catalog.typical_price(4, 40000) == 100.0 and catalog.typical_price(0, 0) is None


def test_item_counts_decays_and_smooths_ctr() -> None:
    s = item.EMPTY
    for k in range(20):
        s = item.apply(s, item.IMPRESSION, T0.timestamp() + k, DAY)
    s = item.apply(s, item.CLICK, T0.timestamp() + 30, DAY)
    assert s[item.N_IMPRESSIONS] == 20 and s[item.N_CLICKS] == 1 and s[item.LAST] == T0.timestamp() + 30
    ctr = item.ctr(s[item.CLICKS], s[item.IMPRESSIONS], 0.05, 20.0)
    assert ctr == pytest.approx((1 + 1) / (20 + 20), rel=1e-3)
    assert item.decode(item.encode(s)) == s


def test_rules_are_pure() -> None:
    s = user.on_interaction(None, click(1), attrs(), None, CFG)
    before = msgspec.msgpack.encode(s)
    user.on_interaction(s, click(2, "p2"), attrs("other"), None, CFG)
    assert msgspec.msgpack.encode(s) == before


def test_a_query_state_stored_before_the_burst_counter_reads_it_as_zero() -> None:
    old = struct.pack("<4d", 100.0, 2.0, 1.0, 0.5)
    assert query_item.decode(old) == (100.0, 2.0, 1.0, 0.5, 0.0, 0.0)
    state = query_item.apply(query_item.decode(old), query_item.CLICKS, 200.0, 1e9, 3600.0)
    assert state[query_item.T_BURST] == 200.0 and state[query_item.BURST_CLICKS] == 1.0


def test_a_word_few_clicks_followed_is_respelled_to_the_closest_trusted_word() -> None:
    speller = Speller.of({"kinect": 40, "kinetic": 3, "battlefield": 9, "rocksmith": 5, "wii": 50,
                          "ps3": 30, "halo": 3, "hale": 2}, min_clicks=3)
    assert speller.respell_all(["kimect", "battlefielf", "nattlefiel", "rocksmoth"]) == (
        "kinect", "battlefield", "battlefield", "rocksmith")  # 1 edit, 1, 2 (long word), 1
    assert speller.respell("kinetc") == "kinect"  # neighbours swapped: one edit
    assert speller.respell("kinetic") == "kinetic"  # trusted (3 clicks) itself
    assert speller.respell("hale") == "halo"  # 2 clicks: not yet trusted
    assert speller.respell("kitten") == "kitten"  # nothing within one edit
    assert speller.respell("wiii") == "wii"
    assert [speller.respell(w) for w in ("ps2", "wi", "halp3")] == ["ps2", "wi", "halp3"]  # digits, short


def test_ties_go_to_the_word_with_more_clicks_and_new_trust_is_seen_at_once() -> None:
    speller = Speller(min_clicks=2)
    for word in ("cart", "card", "card"):
        speller.add(word)
    assert speller.respell("carx") == "card"  # "cart" has one click: not trusted yet
    speller.add("cart", 5)
    assert speller.respell("carx") == "cart"  # one edit from both: the one with more clicks
    assert len(speller) == 2
    assert Speller(min_clicks=0).respell("kimect") == "kimect"  # respelling off


def test_respellings_are_cached_and_the_cache_hits_and_misses_are_exported() -> None:
    def lookups(result: str) -> float:
        return REGISTRY.get_sample_value("shoprank_speller_cache_lookups_total", {"result": result}) or 0.0

    speller = Speller.of({"kinect": 40}, min_clicks=3)
    hits, misses = lookups("hit"), lookups("miss")
    assert [speller.respell("kimect") for _ in range(3)] == ["kinect"] * 3
    assert speller.respell("kinect") == "kinect"  # trusted: never looked up
    assert (lookups("hit") - hits, lookups("miss") - misses) == (2, 1)
    speller.add("lego", 3)  # a word newly trusted could be closer: the cache starts again
    assert speller.respell("kimect") == "kinect" and lookups("miss") - misses == 2
