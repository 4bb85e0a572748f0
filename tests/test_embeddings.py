"""Any shop's catalog: each version ships its product tower, ``shoprank embedder`` embeds what the
catalog publishes into Redis, every scorer's table follows it. Against the real broker and Redis,
with the embedder (and the feature worker) as real processes and the real all-MiniLM-L6-v2 where
text quality matters; tiny random BERTs where it does not."""

from __future__ import annotations

import gc
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
import redis
from tokenizers import Tokenizer

from core import kafka, layout
from core.events import RESULTS, CatalogProduct, Query, RankedResult
from core.pretrained import minilm_path
from core.registry import list_versions, set_serving
from core.settings import ModelSettings, ScorerSettings, Settings
from core.text import product_text
from features import keys
from features.embeddings import Cursor, FeedGap, ProductEmbeddings, encode_value, text_digest
from scorer.app import Scorer, build_scorer
from scorer.embedder import ProductTower, embed_catalog, embed_products
from scorer.runtime import UNKNOWN_ROW, Batch, EmbeddingSource, load_served_model
from streams.testing import Worker, environment, publish, wait_until
from tests.conftest import RedisAt
from tests.model_factory import split, tiny_version
from trainer.model import QueryTower, load_encoder
from trainer.products import embed_texts
from trainer.zero_shot import zero_shot_version

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
DATA = Path(__file__).parent / "data" / "furniture_shop.json"


def catalog(n: int | None = None) -> list[CatalogProduct]:
    products = sorted(split().catalog.values(), key=lambda p: p.product_id)
    return products[:n] if n is not None else products


def edited(p: CatalogProduct, title: str, by: timedelta) -> CatalogProduct:
    return msgspec.structs.replace(p, title=title, updated_at=p.updated_at + by)


def query(text: str) -> Query:
    return Query(query_id=uuid.uuid4().hex, user_id="new-shopper", session_id="s1", text=text, timestamp=T0)


def ask(settings: Settings, queries: list[Query], timeout_s: float = 60) -> dict[str, RankedResult]:
    """Publish queries, return their results by query id (from the real results topic)."""
    consumer = kafka.consumer(settings, group_id=f"reader-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([settings.topics.results])
    publish(settings, queries)
    out: dict[str, RankedResult] = {}
    deadline = time.monotonic() + timeout_s
    try:
        wanted = {q.query_id for q in queries}
        while len(out) < len(queries) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                r = RESULTS.decode(msg.value())
                if r.query_id in wanted:
                    out[r.query_id] = r
    finally:
        consumer.close()
    assert len(out) == len(queries), f"{len(out)} of {len(queries)} results"
    return out


def engine_env(settings: Settings, registry: Path) -> dict[str, str]:
    env = environment(settings)
    env.update({"SHOPRANK_MODEL_REGISTRY_DIR": str(registry), "SHOPRANK_EMBEDDER_CHECK_S": "0.2",
                "SHOPRANK_EMBEDDER_GROUP_ID": f"embedder-{uuid.uuid4().hex[:6]}",
                "SHOPRANK_SCORER_DEVICE": "cpu", "SHOPRANK_LOG_LEVEL": "INFO"})
    return env


def caught_up(settings: Settings, group: str) -> bool:
    """Whether ``group`` has committed the catalog topic to its end."""
    c = kafka.consumer(settings, group_id=group)
    try:
        ends = kafka.watermarks(c, [settings.topics.catalog])
        from confluent_kafka import TopicPartition

        done = c.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        return all(tp.offset >= ends[(tp.topic, tp.partition)][1] for tp in done)
    finally:
        c.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[list[Worker]]:
    """Processes a test starts, stopped (SIGTERM, by pid) whatever happens."""
    started: list[Worker] = []
    yield started
    for w in started:
        if w.alive():
            w.stop()


@pytest.fixture
def scorers() -> Iterator[list[Scorer]]:
    started: list[Scorer] = []
    yield started
    for s in started:
        s.stop()


def start_scorer(settings: Settings, registry: Path, scorers: list[Scorer], retrieve_k: int) -> Scorer:
    s = build_scorer(settings.model_copy(update={
        "model": ModelSettings(registry_dir=registry),
        "scorer": ScorerSettings(max_batch=32, max_wait_ms=5, retrieve_k=retrieve_k, device="cpu",
                                 rerank="off", embeddings_refresh_s=0.1,
                                 group_id=f"scorer-{uuid.uuid4().hex[:6]}"),
    }))
    s.start()
    scorers.append(s)
    wait_until(s.loop.assigned.is_set, 30, what="scorer assigned its partitions")
    return s


# --- Redis layout --------------------------------------------------------------------------------


def test_redis_vectors_are_ordered_idempotent_and_followed(redis_client: redis.Redis) -> None:
    store = ProductEmbeddings(redis_client, "t0", feed_maxlen=5)
    start = store.load()
    assert start.ids == [] and start.cursor == Cursor()
    v1, v2 = np.full(4, 0.5, np.float32), np.full(4, -0.5, np.float32)
    assert store.write([("a", encode_value(1000, text_digest("halo"), v1)),
                        ("b", encode_value(1000, text_digest("fifa"), v1))]) == 2
    loaded = store.load()
    assert sorted(loaded.ids) == ["a", "b"] and loaded.vectors.shape == (2, 4)
    assert store.write([("a", encode_value(999, text_digest("other"), v2))]) == 0  # older: ignored
    assert store.write([("a", encode_value(2000, text_digest("halo"), v2))]) == 0  # same text: same vector
    (a,) = store.stored(["a"])
    assert a is not None and a.updated_at_ms == 2000 and np.array_equal(a.vector, v1)
    assert store.changes(loaded.cursor).ids == []  # nothing a scorer must re-read
    assert store.write([("a", encode_value(2000, text_digest("halo 2"), v2))]) == 1  # an edit
    changed = store.changes(loaded.cursor)
    assert changed.ids == ["a"] and np.array_equal(changed.vectors[0], v2)
    assert store.changes(changed.cursor).ids == []
    assert store.changes(start.cursor).ids  # a reader from before anything was written sees all
    # A reader that falls behind the feed's trimming is told to reload, not left with a hole.
    store.write([(f"p{i}", encode_value(1, text_digest(str(i)), v1)) for i in range(300)])
    with pytest.raises(FeedGap):
        store.changes(changed.cursor)
    reloaded = store.load()
    assert len(reloaded.ids) == 302 and store.changes(reloaded.cursor).ids == []
    assert keys.product_embeddings("t0") == "pe:{t0}" and keys.product_embedding_feed("t0") == "pef:{t0}"


# --- the product tower a version ships -----------------------------------------------------------


def test_a_version_ships_the_tower_that_embedded_its_products(tmp_path: Path) -> None:
    trained = tiny_version(tmp_path, "trained")
    assert layout.PRODUCT_ENCODER in trained.manifest["files"]
    tower = ProductTower(trained)
    ids = json.loads((trained.path / layout.PRODUCT_IDS).read_text())
    products = split().catalog
    again = tower.embed([product_text(products[p]) for p in ids])
    shipped = np.load(trained.path / layout.PRODUCT_EMB)
    assert np.max(np.abs(again - shipped)) < 1e-5  # onnxruntime re-embeds the table torch shipped
    # The zero-shot version from the same (seeded) encoder has the same tower: shared vectors.
    zero = zero_shot_version(tmp_path, "zero", tiny=True)
    other = zero_shot_version(tmp_path, "other", tiny=True, seed=14)
    spec = layout.product_tower(zero.manifest)
    assert spec == layout.product_tower(trained.manifest)
    assert spec != layout.product_tower(other.manifest)


def test_the_zero_shot_version_scores_by_text_match_alone(tmp_path: Path) -> None:
    products = catalog(12)
    version = zero_shot_version(tmp_path, "zero", tiny=True, products=products)
    model = load_served_model(tmp_path, "zero", device="cpu")
    q = model.encode(["halo reach", "kinect sports"])
    cand = np.tile(np.arange(12), (2, 1))
    rng = np.random.default_rng(0)  # whatever the features say
    batch = Batch(q, cand, np.full((2, 3), UNKNOWN_ROW), np.zeros((2, 3), np.float32),
                  rng.normal(size=(2, 12, len(model.feature_names))).astype(np.float32), [12, 12])
    scores = np.stack(model.score(batch))
    cosine = q @ model.product_emb.T
    assert np.allclose(scores, 10.0 * cosine, atol=1e-4)
    assert version.manifest["trained_by"] == "zero_shot"


# --- the scorer's table --------------------------------------------------------------------------


def test_the_scorer_table_follows_redis_copy_on_write(tmp_path: Path, redis_client: redis.Redis) -> None:
    products = catalog(30)
    version = zero_shot_version(tmp_path, "zero", tiny=True, products=products[:20])
    tower = ProductTower(version)
    store = ProductEmbeddings(redis_client, tower.id)
    model = load_served_model(tmp_path, "zero", device="cpu",
                              embeddings=EmbeddingSource(redis_client, refresh_s=0.05))
    first = model.table
    before = first.vectors().copy()
    assert first.n == 20 and model.rows([products[25].product_id])[0] == UNKNOWN_ROW

    assert embed_products(tower, store, products[20:30]).changed == 10
    wait_until(lambda: model.table.n == 30, 10, what="the refresher read the 10 new vectors")
    assert first.n == 20 and np.array_equal(first.vectors(), before)  # the old table is untouched
    new = products[25].product_id
    row = int(model.rows([new])[0])
    assert row >= 20 and model.product_ids[row] == new
    top = model.retrieve(model.table.vectors()[row][None, :], 1)
    assert model.product_ids[int(top[0, 0])] == new  # retrieval covers products added after loading

    # An edit: a new row for the product, its old row never retrieved again; an older record: nothing.
    old = products[3]
    assert embed_products(tower, store, [edited(old, "Kinect Adventures Deluxe Bundle", timedelta(hours=1))]
                          ).changed == 1
    assert embed_products(tower, store, [edited(old, "An older title", -timedelta(hours=1))]).changed == 0
    wait_until(lambda: model.table.n == 31, 10, what="the edit read")
    old_row, new_row = 3, int(model.rows([old.product_id])[0])
    assert new_row == 30 and model.product_ids[new_row] == old.product_id
    everything = model.retrieve(model.encode(["kinect adventures"]), 100)[0].tolist()
    assert len(everything) == 30 and old_row not in everything and new_row in everything

    # A swapped-out model's refresher ends with it.
    name = f"embeddings-{model.version}"
    model = None  # type: ignore[assignment]
    gc.collect()
    wait_until(lambda: not any(t.name == name for t in threading.enumerate()), 5, what="refresher ended")


# --- the embedder, a real process ------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_the_embedder_follows_the_catalog_and_the_serving_tower(
    settings: Settings, redis_at: RedisAt, topology: str, tmp_path: Path, service: list[Worker]
) -> None:
    settings, redis_client = redis_at(topology, settings)
    first = zero_shot_version(tmp_path, "first", tiny=True)
    second = zero_shot_version(tmp_path, "second", tiny=True, seed=14)  # another tower
    set_serving(tmp_path, "first")
    products = catalog(30)
    publish(settings, products)
    env = engine_env(settings, tmp_path)
    embedder = Worker(env, tmp_path / "embedder.log", command="embedder")
    service.append(embedder)
    one = ProductEmbeddings(redis_client, layout.product_tower(first.manifest).id)  # type: ignore[union-attr]
    wait_until(lambda: one.count() == 30, 90, what="30 products embedded")
    tower = ProductTower(first)
    stored = one.stored([p.product_id for p in products[:5]])
    expected = tower.embed([product_text(p) for p in products[:5]])
    assert all(s is not None for s in stored)
    assert np.allclose(np.stack([s.vector for s in stored if s]), expected, atol=1e-6)

    # An edit replaces the vector; a replayed older record of another product changes nothing.
    fresh = edited(products[0], "Forza Motorsport 4 Collector's Edition", timedelta(days=1))
    stale = edited(products[1], "A title from before", -timedelta(days=1))
    publish(settings, [stale, fresh])
    group = env["SHOPRANK_EMBEDDER_GROUP_ID"]
    wait_until(lambda: caught_up(settings, group), 60, what="the embedder committed the catalog's end")
    a, b = one.stored([products[0].product_id, products[1].product_id])
    assert a is not None and a.digest == text_digest(product_text(fresh))
    assert b is not None and b.digest == text_digest(product_text(products[1]))

    # The serving version changes tower: the whole catalog is embedded for it, without a new record.
    set_serving(tmp_path, "second")
    two = ProductEmbeddings(redis_client, layout.product_tower(second.manifest).id)  # type: ignore[union-attr]
    wait_until(lambda: two.count() == 30, 90, what="catalog embedded for the new tower")
    (s,) = two.stored([products[0].product_id])
    assert s is not None and s.digest == text_digest(product_text(fresh))
    assert np.allclose(s.vector, ProductTower(second).embed([product_text(fresh)])[0], atol=1e-6)
    assert embedder.stop() == 0


# --- any shop's catalog, end to end with the real encoder --------------------------------------------


def test_a_product_published_after_training_is_retrieved_and_ranked_first(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, service: list[Worker],
    scorers: list[Scorer],
) -> None:
    products = catalog()
    known = [p for p in products[:60]] + [p for p in products[60:] if "halo" in p.title.lower()]
    version = zero_shot_version(tmp_path, "v1", products=known)  # what the version knew when built
    set_serving(tmp_path, "v1")
    publish(settings, known)
    scorer = start_scorer(settings, tmp_path, scorers, retrieve_k=20)
    service.append(Worker(engine_env(settings, tmp_path), tmp_path / "embedder.log", command="embedder"))
    tower = layout.product_tower(version.manifest)
    assert tower is not None
    live = ProductEmbeddings(redis_client, tower.id)
    wait_until(lambda: live.count() == len(known), 120, what="the catalog embedded")

    new = CatalogProduct(product_id="2012-halo-4-le", title="Halo 4 Limited Edition - Xbox 360",
                         brand="Microsoft", category_path=["Video Games", "Xbox 360", "Xbox 360 Games"],
                         price=99.99, description="Master Chief returns. Includes exclusive armor, "
                         "a Spartan Ops briefing packet and a UNSC Infinity data drive.", updated_at=T0)
    text = "halo 4 limited edition"
    before = ask(settings, [query(text)])
    assert all(p.product_id != new.product_id for r in before.values() for p in r.products)

    publish(settings, [new])  # after the version was built; nothing is retrained
    wait_until(lambda: scorer.holder.current.rows([new.product_id])[0] != UNKNOWN_ROW, 60,
               what="the scorer's table has the new product")
    q = query(new.title)
    q2 = query(text)
    results = ask(settings, [q, q2])
    for asked in (q, q2):
        r = results[asked.query_id]
        assert r.error is None and r.model_version == "v1"
        assert r.products[0].product_id == new.product_id, [p.product_id for p in r.products[:5]]
    assert list_versions(tmp_path) == ["v1"]

    # A hot swap to a version sharing the tower keeps reading Redis: the new product stays found.
    from trainer.commands import announce

    v2 = zero_shot_version(tmp_path, "v2")  # ships no products at all
    set_serving(tmp_path, "v2")
    announce(settings, v2)
    wait_until(lambda: scorer.holder.current.version == "v2", 60, what="swapped to v2")
    assert scorer.holder.current.table.live == len(known) + 1
    q3 = query(new.title)
    r = ask(settings, [q3])[q3.query_id]
    assert r.model_version == "v2" and r.products[0].product_id == new.product_id


def mrr(ranked: list[list[str]], wanted: list[str]) -> float:
    return float(np.mean([1.0 / (r.index(w) + 1) if w in r else 0.0
                          for r, w in zip(ranked, wanted, strict=True)]))


def test_another_shops_catalog_is_ranked_by_text_from_its_first_query(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, service: list[Worker],
    scorers: list[Scorer],
) -> None:
    data = json.loads(DATA.read_text())
    shop = [CatalogProduct(**p, updated_at=T0) for p in data["products"]]
    searches = data["queries"]
    version = zero_shot_version(tmp_path, "new-shop")  # a shop with no data: nothing shipped
    set_serving(tmp_path, "new-shop")
    env = engine_env(settings, tmp_path)
    service.append(Worker(env, tmp_path / "streams.log"))
    service.append(Worker(env, tmp_path / "embedder.log", command="embedder"))
    scorer = start_scorer(settings, tmp_path, scorers, retrieve_k=100)
    assert scorer.holder.current.table.n == 0

    publish(settings, shop)
    wait_until(lambda: scorer.holder.current.table.live == len(shop), 120,
               what="the scorer's table has the shop's catalog")
    queries = [query(s["text"]) for s in searches]
    results = ask(settings, queries)
    served = [[p.product_id for p in results[q.query_id].products] for q in queries]
    wanted = [s["product_id"] for s in searches]
    assert all(len(r) == len(shop) for r in served)

    # The pretrained encoder alone, computed here with torch: cosine of query and product text.
    encoder = QueryTower(load_encoder(minilm_path()))
    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    p_emb = embed_texts(encoder, tokenizer, [product_text(p) for p in shop], progress=False)
    q_emb = embed_texts(encoder, tokenizer, [s["text"] for s in searches], max_len=16, progress=False)
    order = np.argsort(-(q_emb @ p_emb.T), axis=1, kind="stable")
    direct = [[shop[j].product_id for j in row] for row in order]
    served_mrr, direct_mrr = mrr(served, wanted), mrr(direct, wanted)
    firsts = sum(r[0] == w for r, w in zip(served, wanted, strict=True))
    print(f"\nfurniture shop, {len(searches)} queries, {len(shop)} products: served MRR {served_mrr:.4f}, "
          f"pretrained cosine MRR {direct_mrr:.4f}, ranked first {firsts}")
    assert served_mrr >= direct_mrr - 1e-9
    assert served_mrr > 0.5  # random order would give about 0.1

    # The trainer's path before announcing a version: the live catalog (pd: documents the feature
    # worker keeps) is already embedded for this tower, so it only reads.
    wait_until(lambda: len(list(redis_client.scan_iter(match=keys.PRODUCT_DOC + "*"))) == len(shop), 60,
               what="the feature worker stored the catalog")
    again = embed_catalog(redis_client, version)
    assert again.seen == len(shop) and again.embedded == 0 and again.changed == 0
