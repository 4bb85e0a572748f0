"""The scorer against the real broker and Redis: every query answered, bad input answered with its
reason, hot swaps that drop nothing, the HTTP API, and a serving process without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest
from fastapi.testclient import TestClient

from core import kafka
from core.events import RESULTS, Click, ModelUpdate, Query, RankedResult, encode
from core.processes import thread_cpu_s
from core.registry import MANIFEST, set_serving, uri
from core.settings import ModelSettings, ScorerSettings, Settings
from features.memory import MemoryStore
from features.plan import Record
from features.read import FEATURE_NAMES, FEATURE_SCHEMA, Request, read_batch
from scorer.app import Scorer, build_scorer
from scorer.http import create_app
from scorer.runtime import load_served_model
from streams.testing import wait_until
from tests.conftest import RedisAt
from tests.model_factory import split, tiny_version

NOW = datetime(2011, 10, 1, tzinfo=UTC)


def query(text: str = "call of duty", user: str = "u1", candidates: list[str] | None = None) -> Query:
    return Query(query_id=uuid.uuid4().hex, user_id=user, session_id="s1", text=text, candidates=candidates,
                 timestamp=NOW)


@pytest.fixture
def scorer_settings(settings: Settings, tmp_path: Path) -> Settings:
    tiny_version(tmp_path, "v1")
    set_serving(tmp_path, "v1")
    return settings.model_copy(update={
        "model": ModelSettings(registry_dir=tmp_path),
        "scorer": ScorerSettings(max_batch=16, max_wait_ms=5, retrieve_k=20, max_candidates=50,
                                 group_id=f"scorer-{uuid.uuid4().hex[:6]}"),
    })


@contextmanager
def running(settings: Settings) -> Iterator[Scorer]:
    """A scorer started on ``settings`` (the catalog in its Redis), its partitions assigned."""
    s = build_scorer(settings)
    for product in split().catalog.values():
        s.store.apply(product)
    s.start()
    try:
        # Fail here, not later in the test with fewer results and no reason.
        wait_until(s.loop.assigned.is_set, 30, 0.1, "the scorer was assigned its partitions")
        yield s
    finally:
        s.stop()


@pytest.fixture
def scorer(scorer_settings: Settings, redis_client) -> Iterator[Scorer]:
    with running(scorer_settings) as s:
        yield s


def produce(settings: Settings, payloads: list[tuple[str, bytes]]) -> None:
    producer = kafka.producer(settings)
    for key, value in payloads:
        producer.produce(settings.topics.queries, key=key.encode(), value=value)
    assert producer.flush(30) == 0


def collect(settings: Settings, n: int, timeout_s: float = 60) -> list[RankedResult]:
    consumer = kafka.consumer(settings, group_id=f"reader-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([settings.topics.results])
    out: list[RankedResult] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(RESULTS.decode(msg.value()))
    finally:
        consumer.close()
    return out


def test_serving_process_does_not_import_torch() -> None:
    code = "import sys, scorer.app, scorer.commands; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_query_gets_a_result_or_an_error_with_its_reason(
    scorer: Scorer, scorer_settings: Settings
) -> None:
    catalog = list(split().catalog)
    good = [query(), query("halo", candidates=catalog[:30]), query("madden", user="never-seen-before"),
            query("skyrim", candidates=[*catalog[:5], "no-such-product"])]
    payloads = [(q.user_id, encode(q)) for q in good]
    too_many = query("fifa", candidates=[f"p{i}" for i in range(60)])
    payloads.append((too_many.user_id, encode(too_many)))
    blank = encode(query()).replace(b'"text":"call of duty"', b'"text":"   "')
    payloads.append(("u1", blank))
    overlong = encode(query()).replace(b'"text":"call of duty"', b'"text":"' + b"x" * 600 + b'"')
    payloads.append(("u1", overlong))
    payloads.append(("u1", b'{"type": "query", "query_id": "q-broken", '))
    produce(scorer_settings, payloads)

    results = collect(scorer_settings, len(payloads))
    assert len(results) == len(payloads)
    by_id = {r.query_id: r for r in results}
    for q in good:
        r = by_id[q.query_id]
        assert r.error is None and r.model_version == "v1"
        assert [p.position for p in r.products] == list(range(1, len(r.products) + 1))
        assert [p.score for p in r.products] == sorted((p.score for p in r.products), reverse=True)
        assert r.text == q.text and r.features is not None and r.features.schema == FEATURE_SCHEMA
        assert r.features.matrix(len(r.products)).shape == (len(r.products), len(FEATURE_NAMES))
    assert len(by_id[good[0].query_id].products) == 20  # retrieved: no candidates given
    assert {p.product_id for p in by_id[good[1].query_id].products} == set(catalog[:30])
    assert "no-such-product" in {p.product_id for p in by_id[good[3].query_id].products}
    assert "more than the 50 allowed" in (by_id[too_many.query_id].error or "")
    errors = [r.error or "" for r in results if r.query_id not in {q.query_id for q in [*good, too_many]}]
    assert len(errors) == 3
    assert sum("$.text" in e for e in errors) == 2
    assert sum("malformed JSON" in e for e in errors) == 1
    # The Kafka loop's own CPU (polling, delivery reports, commits) is a stage of its own.
    consumed = scorer.metrics.registry.get_sample_value("shoprank_stage_cpu_seconds_total",
                                                        {"stage": "consume"})
    assert consumed is not None and consumed > 0
    assert "scoring-loop" in thread_cpu_s(os.getpid())  # named for top -H and bench.scorer's split


def test_a_scorer_on_the_redis_cluster_serves_what_the_memory_store_reads(
    scorer_settings: Settings, redis_at: RedisAt
) -> None:
    """On the Redis Cluster (owner shards), the scorer reads each shopper in its shard and every
    shard's share of the product and query statistics: the served matrix is the one the memory
    store, holding the same shards, gives for the same request."""
    settings, _ = redis_at("cluster", scorer_settings)
    catalog = list(split().catalog)
    memory = MemoryStore(settings.features)
    for product in split().catalog.values():
        memory.apply(product)
    events: list[Query | Click] = []
    for i in range(24):  # shoppers of every shard follow the same query to the same products
        q = query("call of duty", user=f"u{i}", candidates=catalog[:10])
        q = msgspec.structs.replace(q, timestamp=NOW - timedelta(hours=24 - i))
        events.append(q)
        events.append(Click(event_id=f"c{i}", user_id=f"u{i}", session_id="s1", query_id=q.query_id,
                            product_id=catalog[i % 3], timestamp=q.timestamp + timedelta(seconds=20)))
    for ev in events:
        memory.apply(ev)
    with running(settings) as s:
        s.store.apply_batch([Record(ev) for ev in events])
        asked = query("call of duty", user="u5", candidates=catalog[:10])
        produce(settings, [(asked.user_id, encode(asked))])
        [served] = collect(settings, 1)
    assert served.error is None and served.features is not None
    ranked = [p.product_id for p in served.products]
    [expected] = read_batch(memory, [Request.for_text("u5", asked.text, catalog[:10], list(range(1, 11)))],
                            NOW.timestamp())
    rows = [catalog[:10].index(pid) for pid in ranked]
    np.testing.assert_array_equal(served.features.matrix(len(ranked)), expected.features[rows])
    assert expected.features[:, FEATURE_NAMES.index("user_has_history")].all()
    assert expected.features[:, FEATURE_NAMES.index("query_item_click_share")].any()


def test_hot_swap_drops_nothing_and_rejects_a_bad_version(scorer: Scorer, scorer_settings: Settings) -> None:
    registry = scorer_settings.model.registry_dir
    v2 = tiny_version(registry, "v2", seed=14)
    bad = tiny_version(registry, "v3", seed=15)
    (bad.path / "ranker_head.onnx").write_bytes(b"not a model")
    producer = kafka.producer(scorer_settings)

    def announce(version, sha: str) -> None:
        update = ModelUpdate(model_version=version.version, uri=uri(version.version), manifest_sha256=sha,
                             created_at=NOW)
        producer.produce(scorer_settings.topics.model_updates, value=encode(update))
        producer.flush(10)

    sent = []
    for i in range(120):
        q = query(f"query {i}")
        sent.append(q.query_id)
        produce(scorer_settings, [(q.user_id, encode(q))])
        if i == 40:
            announce(v2, v2.manifest_sha256)
        if i == 80:
            announce(bad, bad.manifest_sha256)
        time.sleep(0.01)
    results = collect(scorer_settings, len(sent))
    assert sorted(r.query_id for r in results) == sorted(sent)
    assert all(r.error is None for r in results)
    versions = {r.model_version for r in results}
    assert versions <= {"v1", "v2"} and "v2" in versions
    assert scorer.holder.current.version == "v2"


def test_a_version_trained_on_other_features_is_refused(tmp_path: Path) -> None:
    old = tiny_version(tmp_path, "old")
    manifest = json.loads((old.path / MANIFEST).read_text())
    manifest["config"]["feature_names"] = manifest["config"]["feature_names"][:-2]
    (old.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="retrain it"):
        load_served_model(tmp_path, "old")


def test_http_api(scorer: Scorer) -> None:
    client = TestClient(create_app(scorer.holder, scorer.ranker, scorer.metrics, scorer.ready))
    q = query("call of duty black ops", candidates=list(split().catalog)[:10])
    ranked = client.post("/rank", content=encode(q)).json()
    assert ranked["query_id"] == q.query_id and len(ranked["products"]) == 10 and ranked["error"] is None
    top = ranked["products"][0]["product_id"]
    explained = client.post("/explain", params={"product_id": top}, content=encode(q)).json()
    assert set(explained["features"]) == set(FEATURE_NAMES)
    assert explained["score"] == pytest.approx(ranked["products"][0]["score"], abs=1e-4)
    bad = client.post("/rank", content=b'{"type": "query"}').json()
    assert bad["error"].startswith("invalid query") and bad["products"] == []
    assert client.get("/healthz").json()["model_version"] == "v1"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True
    metrics = client.get("/metrics").text
    assert "shoprank_query_latency_seconds_bucket" in metrics and 'version="v1"' in metrics
    for stage in ("encode", "features", "model", "results"):  # where the /rank call's time went
        assert f'shoprank_stage_seconds_count{{stage="{stage}"}} ' in metrics, stage


def test_the_cross_encoder_reorders_the_top_k_and_keeps_the_rest(tmp_path: Path, redis_client) -> None:
    """The second stage on a CPU (``SHOPRANK_SCORER_RERANK=always``) with a tiny cross-encoder:
    the first stage's top k come back in the cross-encoder's order, renumbered, features kept;
    the products past k keep their order below them."""
    from features.redis_store import RedisStore
    from scorer.metrics import ScorerMetrics
    from scorer.ranking import QueryRanker
    from scorer.rerank import CrossEncoderSession, RerankingRanker, build_cross_encoder, export_cross_encoder
    from tests.model_factory import tiny_run

    version = tiny_version(tmp_path, "v-rerank")
    model = load_served_model(tmp_path, "v-rerank", device="cpu")
    store = RedisStore(redis_client, Settings().features)
    for product in split().catalog.values():
        store.apply(product)
    graph = export_cross_encoder(build_cross_encoder(tiny_run().model.cfg.encoder), tmp_path / "ce.onnx")
    session = CrossEncoderSession(graph, version.path / "tokenizer.json", ["CPUExecutionProvider"])
    metrics = ScorerMetrics()
    first = QueryRanker(store, retrieve_k=20, max_candidates=50, metrics=metrics)
    titles = {pid: p.title for pid, p in split().catalog.items()}
    second = RerankingRanker(first, lambda _: session, lambda ids: {i: titles[i] for i in ids}, k=5)
    q = query("call of duty black ops", candidates=list(split().catalog)[:12])
    [before] = first.rank(model, [(q, time.time())])
    [after] = second.rank(model, [(q, time.time())])
    top = [p.product_id for p in before.products[:5]]
    expected = session.score([(q.text, titles[pid]) for pid in top])
    by_cross_encoder = sorted(range(5), key=lambda i: -expected[i])
    assert [p.product_id for p in after.products[:5]] == [top[i] for i in by_cross_encoder]
    assert [p.score for p in after.products[:5]] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert [p.product_id for p in after.products[5:]] == [p.product_id for p in before.products[5:]]
    assert [p.position for p in after.products] == list(range(1, 13))
    assert before.features is not None and after.features is not None
    # Features served = features read: the first stage's matrix is the read path's, in ranked order.
    [read] = read_batch(store, [Request.for_text(q.user_id, q.text, q.candidates or [], list(range(1, 13)))],
                        now=q.timestamp.timestamp())
    row_of = {pid: i for i, pid in enumerate(q.candidates or [])}
    np.testing.assert_array_equal(before.features.matrix(12),
                                  read.features[[row_of[p.product_id] for p in before.products]])
    served = dict(zip((p.product_id for p in before.products), before.features.matrix(12), strict=True))
    np.testing.assert_array_equal(after.features.matrix(12), [served[p.product_id] for p in after.products])
    assert (after.features.history, after.features.schema) == (before.features.history, FEATURE_SCHEMA)
    assert metrics.registry.get_sample_value("shoprank_stage_seconds_count", {"stage": "rerank"}) == 1


def read_result_and_wire_bytes(settings: Settings, timeout_s: float = 60) -> tuple[bytes, int]:
    """The one result on the results topic, and the bytes its reader received from the broker
    (librdkafka's statistics: the record batch as stored, i.e. as the producer compressed it,
    plus a few hundred bytes of metadata, group and empty-fetch responses)."""
    stats: list[str] = []
    consumer = kafka.consumer(settings, group_id=f"reader-{uuid.uuid4().hex[:6]}",
                              **{"statistics.interval.ms": 100, "stats_cb": stats.append})
    consumer.subscribe([settings.topics.results])
    value, deadline = None, time.monotonic() + timeout_s
    try:
        while value is None and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                value = msg.value()
        seen = len(stats)
        while len(stats) == seen and time.monotonic() < deadline:  # a report taken after the read
            consumer.poll(0.1)
    finally:
        consumer.close()
    assert value is not None and len(stats) > seen, "no result (or no statistics) read back"
    brokers = json.loads(stats[-1])["brokers"].values()
    return value, sum(b["rxbytes"] for b in brokers)


def test_a_thousand_candidates_come_back_ranked_with_their_features_compact_and_compressed(
    scorer_settings: Settings, redis_client
) -> None:
    """The contract's largest query through the real broker. Size bound: each ranked product is
    ~50 bytes of JSON plus its id, the served matrix 1,000 x 28 float32 in base64 (149 KB), so a
    result with ids of up to ~40 characters stays under 300 KB raw, a third of the 812 KB the
    named-map format measured and far from Kafka's 1 MB default message limit. The producer's
    codec (lz4 by default) at least halves it on the wire (realistic features: lz4 2.9x, zstd
    4.3x, bench/result_size.py --broker; these cold ones, mostly zeros, compress further)."""
    wide = scorer_settings.model_copy(update={
        "scorer": scorer_settings.scorer.model_copy(update={"max_candidates": 1000})})
    catalog = list(split().catalog)
    candidates = [*catalog, *(f"new-sku-{i:05d}" for i in range(1000 - len(catalog)))]  # unknown to it
    q = query("call of duty black ops", candidates=candidates)
    with running(wide):
        produce(wide, [(q.user_id, encode(q))])
        raw, wire = read_result_and_wire_bytes(wide)
    r = RESULTS.decode(raw)
    assert r.query_id == q.query_id and r.error is None and r.text == q.text
    assert len(r.products) == 1000 and {p.product_id for p in r.products} == set(candidates)
    assert [p.position for p in r.products] == list(range(1, 1001))
    assert r.features is not None and r.features.schema == FEATURE_SCHEMA
    matrix = r.features.matrix(1000)
    assert matrix.shape == (1000, len(FEATURE_NAMES)) and np.isfinite(matrix).all()
    position = FEATURE_NAMES.index("position")  # rows follow the ranked order: the original positions
    assert [int(matrix[i, position]) for i in range(1000)] == [
        candidates.index(p.product_id) + 1 for p in r.products]
    assert len(raw) < 300_000
    assert wire < len(raw) / 2, (wire, len(raw))
