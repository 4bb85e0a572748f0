"""One suite, two stores: the in-memory store (training) and the Redis store (serving) must
behave alike, down to the bit, on the same events."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest
import redis

from core.events import CatalogProduct, Click, Purchase, Query, QueryContext, RankedProduct, RankedResult
from core.settings import FeatureSettings
from core.text import normalize_query, query_words
from features import item
from features.memory import MemoryStore
from features.plan import Record, Source
from features.read import FEATURE_NAMES, INDEX, Request, read_batch
from features.redis_store import RedisStore
from features.store import FeatureStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CFG = FeatureSettings()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    if request.param == "memory":
        yield MemoryStore(CFG)
    else:
        client: redis.Redis = request.getfixturevalue("redis_client")
        yield RedisStore(client, CFG)


def product(pid: str, cat: str = "tv", price: float = 100.0) -> CatalogProduct:
    return CatalogProduct(product_id=pid, title=pid, brand="acme", category_path=[cat], price=price,
                          updated_at=T0 - timedelta(days=10))


def click(eid: str, pid: str = "p1", user: str = "u1", minutes: float = 0, query_id: str | None = None,
          kind: type = Click) -> Click:
    extra = {"order_id": "o", "price": 80.0} if kind is Purchase else {}
    return kind(event_id=eid, user_id=user, session_id="s", product_id=pid, query_id=query_id,
                timestamp=T0 + timedelta(minutes=minutes), **extra)


def query(qid: str, text: str = "Big TV!", minutes: float = 0) -> Query:
    return Query(query_id=qid, user_id="u1", session_id="s", text=text,
                 timestamp=T0 + timedelta(minutes=minutes))


def load_catalog(store: FeatureStore) -> None:
    store.apply_batch([Record(product(p, c, price)) for p, c, price in
                       [("p1", "tv", 100.0), ("p2", "tv", 300.0), ("p3", "phone", 50.0)]])


def test_serves_the_catalog_documents_as_last_sent(store: FeatureStore) -> None:
    load_catalog(store)
    edited = msgspec.structs.replace(product("p2", "tv", 250.0), title="p2 v2", updated_at=T0)
    store.apply(edited)
    docs = store.products(["p1", "p2", "nope"])
    assert docs == {"p1": product("p1", "tv", 100.0), "p2": edited}
    assert store.products([]) == {}


def test_applies_interactions_to_shopper_and_product(store: FeatureStore) -> None:
    load_catalog(store)
    out = store.apply_batch([Record(click("e1")), Record(click("e2", "p3", kind=Purchase, minutes=1))])
    assert (out.applied, out.duplicates, out.rejected) == (2, 0, [])
    s = store.user("u1")
    assert s is not None and (s.n_clicks, s.n_purchases) == (1, 1)
    assert [r.product_id for r in s.recent] == ["p1", "p3"]
    # the price level: the click at p1's catalog price (tv typical 200), the purchase as paid (phone 50)
    w = CFG.purchase_weight
    assert s.price_sum / s.price_weight == pytest.approx((np.log(0.5) + w * np.log(1.6)) / (1 + w), rel=1e-4)
    # the candidates' prices against it (shrunk toward typical by the prior weight): p2 (300
    # against tv's 200) and p3 (50, phone's typical)
    level = s.price_sum / (s.price_weight + CFG.preference_prior_weight)
    [res] = read_batch(store, [Request("u1", "", ["p2", "p3"])], (T0 + timedelta(minutes=2)).timestamp())
    ratios = np.log([1.5, 1.0])
    assert res.features[:, INDEX["price_ratio_log"]] == pytest.approx(ratios - level, rel=1e-5)
    assert res.features[:, INDEX["price_level_cross"]] == pytest.approx(ratios * level, rel=1e-5, abs=1e-7)


def test_a_click_alone_sets_the_price_level(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply_batch([Record(click("e1", "p2"))])  # no purchase, no catalog update in the batch
    s = store.user("u1")
    assert s is not None and s.price_sum / s.price_weight == pytest.approx(np.log(300.0 / 200.0))


def test_same_event_twice_counts_once(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply_batch([Record(click("e1")), Record(click("e1"))])
    out = store.apply_batch([Record(click("e1"))])
    assert out.duplicates == 1 and out.applied == 0
    s = store.user("u1")
    assert s is not None and s.n_clicks == 1


def test_redelivered_offsets_are_skipped_even_without_markers(store: FeatureStore) -> None:
    load_catalog(store)
    src = [Source("t", 0, i) for i in range(3)]
    store.apply_batch([Record(click(f"e{i}"), src[i]) for i in range(2)])
    out = store.apply_batch([Record(click("other-id"), src[1]), Record(click("e9"), src[2])])
    assert (out.applied, out.duplicates) == (1, 1)
    s = store.user("u1")
    assert s is not None and s.n_clicks == 3


def test_unknown_product_is_rejected_with_reason_and_the_rest_applies(store: FeatureStore) -> None:
    load_catalog(store)
    out = store.apply_batch([Record(click("e1", "ghost")), Record(click("e2"))])
    assert [i for i, _ in out.rejected] == [0]
    assert "unknown product_id 'ghost'" in out.rejected[0][1]
    assert out.applied == 1


def test_a_result_showing_unknown_products_is_kept_and_its_known_ones_counted(store: FeatureStore) -> None:
    load_catalog(store)
    shown = ["p2", "nope", "p1", "gone"]
    result = RankedResult(query_id="q1", user_id="u1", session_id="s", model_version="v",
                          products=[RankedProduct(product_id=p, score=1, position=i)
                                    for i, p in enumerate(shown, 1)], timestamp=T0)
    out = store.apply_batch([Record(result)])
    assert (out.applied, out.rejected) == (1, [])
    assert out.unknown_impressions == [("q1", ["nope", "gone"])]
    items = store.snapshot([], ["p1", "p2", "p3", "nope", "gone"], []).items
    assert {p: st[item.N_IMPRESSIONS] for p, st in items.items()} == {"p1": 1.0, "p2": 1.0}
    again = store.apply_batch([Record(result)])  # its marker was written: a duplicate, not recounted
    assert again.duplicates == 1 and again.unknown_impressions == []


def test_click_joins_its_query_text_whichever_arrives_first(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply(click("e1", query_id="q1", minutes=1))  # before its query: waits
    store.apply(query("q1"))
    store.apply(query("q2", text="big tv", minutes=2))
    store.apply(click("e2", "p2", query_id="q2", minutes=3))
    now = (T0 + timedelta(minutes=3)).timestamp()
    [res] = read_batch(store, [Request("u1", normalize_query("big tv"), ["p1", "p2", "p3"])], now)
    f = res.features
    p1_clicks = 2 ** (-120 / CFG.query_half_life_s)  # its click, two minutes before ``now``
    assert f[0, INDEX["query_item_clicks_log"]] == pytest.approx(np.log1p(p1_clicks), rel=1e-5)
    assert f[0, INDEX["query_item_click_share"]] == pytest.approx(p1_clicks / (1 + p1_clicks), rel=1e-5)
    assert f[2, INDEX["query_item_clicks_log"]] == 0.0
    assert f[:, INDEX["query_clicks_log"]] == pytest.approx(np.log1p(1 + p1_clicks), rel=1e-5)
    assert f[0, INDEX["query_item_idle_hours_log"]] == pytest.approx(np.log1p(2 / 60), rel=1e-4)
    assert f[1, INDEX["query_item_idle_hours_log"]] == 0.0


def test_a_new_query_finds_what_its_words_led_to(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply(query("q1", text="Big TV"))
    store.apply(click("e1", "p1", query_id="q1", minutes=1))
    store.apply(query("q2", text="cheap phone", minutes=2))
    store.apply(click("e2", "p3", query_id="q2", minutes=3))
    store.apply(query("q3", text="tv", minutes=4))
    store.apply(click("e3", "p2", query_id="q3", minutes=5))
    text = "cheap TV"  # never searched as a whole
    now = (T0 + timedelta(minutes=6)).timestamp()
    [res] = read_batch(store, [Request("u1", normalize_query(text), ["p1", "p2", "p3"],
                                       words=query_words(text))], now)
    f = res.features
    assert not f[:, INDEX["query_item_clicks_log"]].any()
    # "tv" led to p1 and p2 (half each), "cheap" to p3
    assert f[:, INDEX["query_word_share_max"]] == pytest.approx([0.5, 0.5, 1.0], rel=1e-3)
    assert f[:, INDEX["query_word_share_mean"]] == pytest.approx([0.25, 0.25, 0.5], rel=1e-3)
    assert f[:, INDEX["query_word_share_min"]].tolist() == [0.0, 0.0, 0.0]
    assert f[:, INDEX["query_words_log"]] == pytest.approx(np.log1p(2.0))


def test_the_location_lift_sets_a_regions_clicks_against_everywheres(store: FeatureStore) -> None:
    load_catalog(store)
    # West and "US West" click p1 once each, east p2 twice (once from a phone); an unlocated click
    # counts under no context.
    for i, (where, device, pid) in enumerate([("west", None, "p1"), ("east", "mobile", "p2"),
                                              ("east", None, "p2"), ("US West", None, "p1"),
                                              (None, None, "p3")]):
        store.apply(Query(query_id=f"q{i}", user_id=f"u{i}", session_id="s", text="tv",
                          context=QueryContext(location=where, device=device),
                          timestamp=T0 + timedelta(minutes=i)))
        store.apply(click(f"e{i}", pid, user=f"u{i}", minutes=i + 0.5, query_id=f"q{i}"))
    now = (T0 + timedelta(minutes=6)).timestamp()
    cands = ["p1", "p2", "p3"]

    def read(context: QueryContext | None) -> np.ndarray:
        return read_batch(store, [Request.for_text("u9", "tv", cands, context=context)], now)[0].features

    west = read(QueryContext(location="west", device="mobile"))
    prior = CFG.context_prior_clicks
    # everywhere located: p1 and p2 half each; west: p1 once (and "US West" is another place)
    expected = np.log([(1 + prior * 0.5) / (1 + prior) / 0.5, (prior * 0.5) / (1 + prior) / 0.5])
    assert west[:2, INDEX["context_location_lift"]] == pytest.approx(expected, rel=1e-3)
    assert west[2, INDEX["context_location_lift"]] == 0.0  # no located click: no lift
    assert west[:, INDEX["context_location_clicks_log"]] == pytest.approx(np.log1p(1.0), rel=1e-3)
    # one device-tagged click, on p2: the phone's share is everywhere's, so no lift
    assert west[:, INDEX["context_device_lift"]] == pytest.approx(0.0, abs=1e-6)
    assert west[:, INDEX["context_device_clicks_log"]] == pytest.approx(np.log1p(1.0), rel=1e-3)
    spaced = read(QueryContext(location=" US  West "))  # whitespace folds: the same place
    assert spaced[0, INDEX["context_location_lift"]] == pytest.approx(expected[0], rel=1e-3)
    nowhere = read(QueryContext(location="north"))  # no click from there: the prior alone, lift 0
    assert nowhere[:, INDEX["context_location_lift"]] == pytest.approx(0.0, abs=1e-6)
    columns = [INDEX[n] for n in FEATURE_NAMES if n.startswith("context_")]
    assert not read(None)[:, columns].any()


def test_a_misspelled_query_reads_the_evidence_of_its_respelling(store: FeatureStore) -> None:
    load_catalog(store)
    for i in range(3):  # "kinect" and "sport" become trusted words (3 clicks each)
        store.apply(query(f"q{i}", text="Kinect Sports", minutes=2 * i))
        store.apply(click(f"e{i}", "p2", query_id=f"q{i}", minutes=2 * i + 1))
    store.apply(query("q3", text="kinect", minutes=7))
    store.apply(click("e3", "p1", query_id="q3", minutes=8))
    now = (T0 + timedelta(minutes=10)).timestamp()
    texts = ["kimect sports", "kimect", "kitten sports"]
    typo, typo_alone, far = (r.features for r in read_batch(
        store, [Request.for_text("u1", t, ["p1", "p2", "p3"]) for t in texts], now))
    share, word_max = INDEX["query_item_click_share"], INDEX["query_word_share_max"]
    assert typo[:, share].tolist() == [0.0, 1.0, 0.0]  # "kinect sports" led to p2
    assert typo[:, word_max] == pytest.approx([0.25, 1.0, 0.0], rel=1e-3)
    assert typo_alone[:, share].tolist() == [1.0, 0.0, 0.0]  # "kinect" alone led to p1
    assert not far[:, share].any()  # "kitten" is two edits from "kinect": a word of its own
    assert far[:, INDEX["query_word_share_min"]].tolist() == [0.0, 0.0, 0.0]
    store.apply(query("q4", text="kimect", minutes=11))  # once a click follows the typo itself,
    store.apply(click("e4", "p3", query_id="q4", minutes=12))  # its own evidence counts
    [own] = read_batch(store, [Request.for_text("u1", "kimect", ["p1", "p2", "p3"])], now + 180)
    assert own.features[:, share].tolist() == [0.0, 0.0, 1.0]


def test_a_scorer_reloads_the_spelling_dictionary_once_a_refresh_interval(redis_client: redis.Redis) -> None:
    store = RedisStore(redis_client, FeatureSettings(spelling_refresh_s=3600))
    load_catalog(store)
    assert store.speller().respell("kimect") == "kimect"  # nobody has searched "kinect" yet
    for i in range(3):
        store.apply(query(f"q{i}", text="kinect", minutes=2 * i))
        store.apply(click(f"e{i}", "p1", query_id=f"q{i}", minutes=2 * i + 1))
    assert store.speller().respell("kimect") == "kimect"  # not one read per query: the loaded copy
    assert RedisStore(redis_client, CFG).speller().respell("kimect") == "kinect"  # a fresh load


def test_the_burst_share_follows_the_last_hours(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply(query("q1", text="tv"))
    for i in range(3):  # three clicks on p1 two days ago, one on p2 an hour ago
        store.apply(click(f"e{i}", "p1", query_id="q1", minutes=1 + i))
    store.apply(query("q2", text="tv", minutes=47 * 60))
    store.apply(click("e9", "p2", query_id="q2", minutes=47 * 60 + 1))
    now = (T0 + timedelta(hours=48)).timestamp()
    [res] = read_batch(store, [Request("u1", normalize_query("tv"), ["p1", "p2"])], now)
    share = res.features[:, INDEX["query_item_click_share"]]
    burst = res.features[:, INDEX["query_item_burst_share"]]
    assert share[0] > share[1]  # over a week p1 still leads
    assert burst[1] > 0.9 > 0.1 > burst[0]  # over the last hours p2 does (6 h half-life: 2^-8 left of p1)


def test_forget_removes_shopper_and_late_events_do_not_bring_them_back(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply(click("e1", minutes=0))
    store.forget("u1", (T0 + timedelta(minutes=5)).timestamp())
    assert store.user("u1") is None
    store.apply(click("e2", minutes=4))  # late: happened before the forget
    assert store.user("u1") is None
    assert store.item("p1")[1] > 1.9  # product statistics still count it (anonymous aggregate)
    store.apply(click("e3", minutes=6))  # new activity after the forget starts afresh
    s = store.user("u1")
    assert s is not None and s.n_clicks == 1


def test_stale_catalog_update_is_ignored_and_typical_price_follows(store: FeatureStore) -> None:
    load_catalog(store)
    store.apply(CatalogProduct(product_id="p2", title="p2", category_path=["tv"], price=500.0,
                               updated_at=T0 - timedelta(days=20)))
    snap = store.snapshot([], ["p2"], [])
    assert snap.products["p2"].price == 300.0
    assert snap.category_prices["tv"] == (2, 40000)


def test_cold_start_reads_defaults(store: FeatureStore) -> None:
    [res] = read_batch(store, [Request("nobody", "never seen", ["x", "y"], positions=[1, 2])], T0.timestamp())
    assert res.features.shape == (2, len(FEATURE_NAMES)) and res.features.dtype == np.float32
    assert res.features[:, INDEX["user_has_history"]].tolist() == [0.0, 0.0]
    assert res.features[:, INDEX["position"]].tolist() == [1.0, 2.0]
    assert res.features[:, INDEX["item_ctr"]].tolist() == pytest.approx([CFG.ctr_prior] * 2)
    assert res.recent_products == () and res.recent_weights.shape == (0,)


def test_rejected_events_are_handed_over_before_the_batch_commits(store: FeatureStore) -> None:
    load_catalog(store)
    seen: list[tuple[list[tuple[int, str]], bool]] = []

    def on_rejected(rejected: list[tuple[int, str]]) -> None:
        seen.append((rejected, store.user("u1") is None))  # called before anything is written

    out = store.apply_batch([Record(click("e1")), Record(click("e2", "ghost"))], on_rejected)
    assert seen == [(out.rejected, True)]  # True: the shopper was not written yet
    assert out.rejected[0][0] == 1 and store.user("u1") is not None
