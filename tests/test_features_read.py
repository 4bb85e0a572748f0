"""The read path gives the trainer (memory store) and the scorer (Redis) identical matrices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from core.events import AddToCart, CatalogProduct, Click, Purchase
from core.settings import FeatureSettings, Settings
from core.text import normalize_query, query_words
from features.memory import MemoryStore
from features.plan import Record
from features.read import FEATURE_NAMES, INDEX, Request, read_batch
from features.redis_store import RedisStore
from streams.synthetic import Shape, catalog, sessions
from tests.conftest import RedisAt

CFG = FeatureSettings()


def _scenario() -> tuple[list, list[Request], float]:
    """Sessions over a small catalog, and requests reading every kind of feature of it."""
    shape = Shape(users=50, products=120)
    events = [*catalog(shape), *sessions(shape, 1500)]
    now = events[-1].timestamp.timestamp() + 3600
    texts = ["tv case", "laptop phone", "nothing like it"]
    requests = [Request(f"u{u}", normalize_query(texts[u % 3]), [f"p{p}" for p in range(0, 120, 3)],
                        positions=list(range(1, 41)), words=query_words(texts[u % 3])) for u in range(50)]
    requests.append(Request("u1", normalize_query("case for a phone"), [f"p{p}" for p in range(120)],
                            words=query_words("case for a phone")))  # a new query of known words
    requests.append(Request.for_text("u2", "lapotp phnoe", [f"p{p}" for p in range(120)]))  # typos
    requests.append(Request("stranger", "", ["p1", "unknown-product"]))
    return events, requests, now


def _assert_identical(stores: list, requests: list[Request], now: float) -> None:
    first = read_batch(stores[0], requests, now)
    for other in stores[1:]:
        assert stores[0].users() == other.users()
        for a, b in zip(first, read_batch(other, requests, now), strict=True):
            assert a.features.shape == (len(a.features), len(FEATURE_NAMES))
            np.testing.assert_array_equal(a.features, b.features)
            assert a.recent_products == b.recent_products
            np.testing.assert_array_equal(a.recent_weights, b.recent_weights)


def test_memory_and_redis_give_identical_matrices(redis_client: redis.Redis) -> None:
    events, requests, now = _scenario()
    memory, online = MemoryStore(CFG), RedisStore(redis_client, CFG)
    for ev in events:  # offline: one event at a time, in time order
        memory.apply(ev)
    for i in range(0, len(events), 250):  # online: batches, as a worker commits them
        online.apply_batch([Record(ev) for ev in events[i : i + 250]])
    _assert_identical([memory, online], requests, now)
    results = read_batch(memory, requests, now)
    assert any(r.features[:, INDEX["query_item_clicks_log"]].any() for r in results)
    assert results[-3].features[:, INDEX["query_word_share_max"]].any()  # the new query
    assert results[-2].features[:, INDEX["query_item_click_share"]].any()  # "laptop phone"'s evidence


def test_owner_shards_read_identically_on_memory_single_redis_and_the_cluster(
        redis_client: redis.Redis, redis_cluster: RedisCluster) -> None:
    """The same sharded state (6 owner shards) on the memory store, one Redis and a Redis Cluster:
    bit-identical matrices, through the one read path; and the same features as unsharded state
    but for float rounding (the shards' shares of a product's decayed sums are added at read)."""
    events, requests, now = _scenario()
    cfg = CFG.model_copy(update={"shards": 6})
    memory, single, cluster = MemoryStore(cfg), RedisStore(redis_client, cfg), RedisStore(redis_cluster, cfg)
    unsharded = MemoryStore(CFG)
    for ev in events:
        memory.apply(ev)
        unsharded.apply(ev)
    for i in range(0, len(events), 250):
        batch = [Record(ev) for ev in events[i : i + 250]]
        single.apply_batch(batch)
        cluster.apply_batch(batch)
    assert {int(k.decode().split("{s")[1].split(".")[0]) for k in redis_cluster.scan_iter(match="u:*")} \
        == set(range(6)), "every shard holds shoppers"
    _assert_identical([memory, single, cluster], requests, now)
    for a, b in zip(read_batch(memory, requests, now), read_batch(unsharded, requests, now), strict=True):
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_a_reader_keeps_the_catalog_until_it_changes(topology: str, settings: Settings,
                                                      redis_at: RedisAt) -> None:
    """A reader (the scorer's store) keeps the product attributes and category prices it read:
    its next read asks Redis for fewer keys. A catalog change made by another writer (a feature
    worker's store) reads at once, and so does a cleared store."""
    settings, client = redis_at(topology, settings)
    cfg = settings.features
    reader, writer, memory = RedisStore(client, cfg), RedisStore(client, cfg), MemoryStore(cfg)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)

    def publish(pid: str, price: float, category: str) -> None:
        ev = CatalogProduct(product_id=pid, title=pid, category_path=[category], price=price, updated_at=t0)
        writer.apply(ev)
        memory.apply(ev)

    def same_catalog() -> None:
        for store in (memory, reader):
            snap = store.snapshot([], ["a", "b", "c"], {})
            assert (snap.products, snap.category_prices) == (expected.products, expected.category_prices)

    def keys_looked_up() -> int:
        stats = client.info("stats")
        return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])

    publish("a", 10.0, "x")
    publish("b", 30.0, "x")
    expected = memory.snapshot([], ["a", "b", "c"], {})
    assert set(expected.products) == {"a", "b"}
    same_catalog()
    if topology == "single":  # one server's counters: the cached read skips the attributes
        before = keys_looked_up()
        reader.snapshot([], ["a", "b", "c"], {})
        cached = keys_looked_up() - before
        before = keys_looked_up()
        RedisStore(client, cfg).snapshot([], ["a", "b", "c"], {})  # a reader with nothing cached
        assert cached < keys_looked_up() - before
    publish("a", 20.0, "x")  # a new price, a new product, a new category
    publish("c", 5.0, "y")
    expected = memory.snapshot([], ["a", "b", "c"], {})
    assert expected.products["a"].price == 20.0 and "y" in expected.category_prices
    same_catalog()
    writer.clear()
    memory = MemoryStore(cfg)
    expected = memory.snapshot([], ["a", "b", "c"], {})
    same_catalog()


def test_recent_products_rank_purchase_over_cart_over_click_and_decay() -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    store = MemoryStore(CFG)
    for p in ("a", "b", "c", "d"):
        store.apply(CatalogProduct(product_id=p, title=p, category_path=["x"], price=10.0, updated_at=t0))
    common = {"user_id": "u", "session_id": "s", "timestamp": t0}
    store.apply(Click(event_id="1", product_id="a", **common))
    store.apply(AddToCart(event_id="2", product_id="b", **common))
    store.apply(Purchase(event_id="3", product_id="c", order_id="o", price=10.0, **common))
    store.apply(Click(event_id="4", product_id="d", **common | {"timestamp": t0 - timedelta(days=4)}))
    [res] = read_batch(store, [Request("u", "", ["a", "d"])], t0.timestamp())
    assert res.recent_products == ("c", "b", "a", "d")
    assert res.recent_weights.tolist() == [5.0, 3.0, 1.0, 0.25]  # d: two half-lives old
    assert res.features[:, INDEX["user_item_interest"]].tolist() == [1.0, 0.25]


def test_reads_are_point_in_time() -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    store = MemoryStore(CFG)
    store.apply(CatalogProduct(product_id="a", title="a", category_path=["x"], price=10.0, updated_at=t0))
    store.apply(Click(event_id="1", product_id="a", user_id="u", session_id="s", timestamp=t0))
    [now] = read_batch(store, [Request("u", "", ["a"])], t0.timestamp())
    week_later = t0.timestamp() + CFG.item_half_life_s
    [week] = read_batch(store, [Request("u", "", ["a"])], week_later)
    clicks = INDEX["item_clicks_log"]
    assert now.features[0, clicks] == np.float32(np.log1p(1.0))
    assert week.features[0, clicks] == np.float32(np.log1p(0.5))
    [gone] = read_batch(store, [Request("u", "", ["a"])], t0.timestamp() + CFG.user_ttl_s + 1)
    assert gone.features[0, INDEX["user_has_history"]] == 0.0


def test_release_days_are_signed_and_fall_back_to_the_first_listing() -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    store = MemoryStore(CFG)
    store.apply(CatalogProduct(product_id="preorder", title="a", released_at=t0 + timedelta(days=3),
                               updated_at=t0))
    store.apply(CatalogProduct(product_id="listed", title="b", updated_at=t0 - timedelta(days=9)))
    [res] = read_batch(store, [Request("u", "", ["preorder", "listed", "unknown"])], t0.timestamp())
    days = res.features[:, INDEX["item_release_days_log"]]
    assert days.tolist() == pytest.approx([-np.log1p(3.0), np.log1p(9.0), 0.0], rel=1e-5)
