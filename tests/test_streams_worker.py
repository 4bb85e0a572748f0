"""Real feature workers (``shoprank streams`` processes) against the real broker and Redis.

Each test compares what the workers left in Redis with an offline recomputation of the same
events through the memory store: shopper features must be exactly equal. Product statistics are
updated by several agents in an order that varies from run to run, so they are compared to within
float rounding (1e-9 relative).
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import TopicPartition
from redis.crc import key_slot

from core import kafka
from core.events import Click, Event, encode
from core.settings import ROOT, Settings
from features import keys
from features.memory import MemoryStore
from features.redis_store import RedisStore
from streams.rebuild import rebuild
from streams.synthetic import Shape, catalog, sessions
from streams.testing import Worker, environment, publish, wait_until
from tests.conftest import RedisAt

SHAPE = Shape(users=300, products=400)
FEATURES = Settings().features  # what the workers run with (environment() sets no feature rule)
MakeWorker = Callable[..., Worker]
# The default librdkafka batch engine, and faust agents (SHOPRANK_STREAMS_ENGINE=faust).
ENGINES = pytest.mark.parametrize("engine", ["batch", "faust"])


@pytest.fixture
def start_worker(settings_factory: Callable[..., Settings], tmp_path: Path) -> Iterator[MakeWorker]:
    started: list[Worker] = []

    def start(settings: Settings, **streams: object) -> Worker:
        streams.setdefault("group_id", f"g-{settings.topics.interactions}")
        streams.setdefault("session_timeout_s", 6)
        w = Worker(environment(settings, **streams), tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        if w.alive():
            w.kill()


def applied(store: RedisStore) -> int:
    return store.stats().get(keys.STATS_APPLIED, 0)


def counted_events(events: list[Event]) -> int:
    """Events that leave an "applied" marker: all but catalog updates."""
    return sum(1 for e in events if not hasattr(e, "updated_at"))


def wait_applied(store: RedisStore, n: int, workers: list[Worker], timeout: float = 60) -> None:
    def done() -> bool:
        if not any(w.alive() for w in workers):
            raise AssertionError("every worker died:\n" + workers[-1].log_tail())
        return applied(store) >= n

    wait_until(done, timeout, what=f"{n} events applied (now {applied(store)})")


def load_catalog(settings: Settings, store: RedisStore, worker: Worker) -> list[Event]:
    products = catalog(SHAPE)
    publish(settings, products)
    ids = [p.product_id for p in products]
    wait_until(lambda: len(store.products(ids)) == len(products), 60, what="catalog in Redis")
    return list(products)


def assert_matches_offline(store: RedisStore, events: list[Event]) -> None:
    offline = MemoryStore(store.config)
    for ev in events:
        offline.apply(ev)
    expected, got = offline.users(), store.users()
    assert got.keys() == expected.keys()
    different = [u for u in expected if got[u] != expected[u]]
    assert not different, f"{len(different)} shoppers differ, e.g. {different[0]}"
    for pid in {e.product_id for e in events if isinstance(e, Click)}:
        a, b = offline.item(pid), store.item(pid)
        assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True)), pid


@pytest.fixture
def single(settings: Settings, redis_client: redis.Redis) -> RedisStore:
    return RedisStore(redis_client, FEATURES)


# Exactly once on one Redis with either engine, and on the Redis Cluster (owner shards).
TOPOLOGIES = pytest.mark.parametrize(("engine", "topology"),
                                     [("batch", "single"), ("faust", "single"), ("batch", "cluster")])


@ENGINES
def test_events_reach_redis_and_bad_input_goes_to_dead_letters(
    settings: Settings, single: RedisStore, start_worker: MakeWorker, engine: str
) -> None:
    worker = start_worker(settings, engine=engine)
    products = load_catalog(settings, single, worker)
    events = list(sessions(SHAPE, 1500))
    t = settings.topics
    ghost = Click(event_id="ghost", user_id="u3", session_id="s", product_id="nope",
                  timestamp=events[0].timestamp)
    bad = [
        (t.interactions, "u1", b"{not json"),
        (t.interactions, "u2", b'{"type": "click", "event_id": "x", "user_id": "u2", "session_id": "s", '
                               b'"timestamp": "2026-01-01T00:00:00Z"}'),
        (t.interactions, "u3", encode(ghost)),
    ]
    half = len(events) // 2
    publish(settings, [*events[:half], *bad, *events[half:]])
    wait_applied(single, counted_events(events), [worker])

    # A fresh click on a caught-up worker reaches Redis (latency is measured by the benchmark).
    late = Click(event_id="fresh", user_id="u-new", session_id="s", product_id="p1",
                 timestamp=events[-1].timestamp)
    publish(settings, [late])
    wait_until(lambda: single.user("u-new") is not None, 10, interval=0.002, what="fresh click")

    letters = read_dead_letters(settings, 3)
    assert dead_letters_written(settings) == 3  # what the backlog test counts sees them
    reasons = " | ".join(h["reason"] for h in letters)
    for why in ("malformed JSON", "Object missing required field `product_id`", "unknown product_id 'nope'"):
        assert why in reasons
    assert all(h["source_topic"] == t.interactions and h["source_offset"].isdigit() for h in letters)
    assert worker.alive()
    assert_matches_offline(single, [*products, *events, late])


def test_a_backlog_waits_for_its_catalog(
    settings: Settings, single: RedisStore, start_worker: MakeWorker
) -> None:
    # Catalog and shopper events are all waiting when the worker starts: without the catalog
    # gate, clicks read before their products' catalog records would be dead-lettered.
    products = catalog(SHAPE)
    events = list(sessions(SHAPE, 3000))
    publish(settings, [*products, *events])
    worker = start_worker(settings, batch_size=200)
    wait_applied(single, counted_events(events), [worker])
    assert_matches_offline(single, [*products, *events])
    # Dead letters are acknowledged by the broker before their batch commits: none were written.
    assert dead_letters_written(settings) == 0


def dead_letters_written(settings: Settings) -> int:
    """How many records the dead-letter topic holds (its partitions' end offsets)."""
    consumer = kafka.consumer(settings, group_id=f"dlq-count-{settings.topics.dead_letter}")
    try:
        marks = kafka.watermarks(consumer, [settings.topics.dead_letter])
    finally:
        consumer.close()
    return sum(high - low for low, high in marks.values())


def read_dead_letters(settings: Settings, n: int) -> list[dict[str, str]]:
    consumer = kafka.consumer(settings, group_id=f"dlq-reader-{settings.topics.dead_letter}")
    consumer.assign([TopicPartition(settings.topics.dead_letter, 0, 0)])
    out: list[dict[str, str]] = []
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        for m in consumer.consume(10, timeout=0.5):
            if not m.error():
                out.append({k: v.decode() for k, v in m.headers() or []})
    consumer.close()
    assert len(out) == n, out
    return out


@TOPOLOGIES
def test_sigkill_mid_stream_loses_and_double_counts_nothing(
    settings: Settings, start_worker: MakeWorker, engine: str, topology: str, redis_at: RedisAt
) -> None:
    settings, client = redis_at(topology, settings)
    store = RedisStore(client, settings.features)
    # Static membership: a restarted worker takes its partitions back without waiting for the
    # dead one's session to expire.
    worker = start_worker(settings, instance_id="w1", batch_size=500, engine=engine)
    products = load_catalog(settings, store, worker)
    events = list(sessions(SHAPE, 8000))
    total = counted_events(events)
    publish(settings, events)
    kills = 0
    for fraction in (0.2, 0.45, 0.7):
        wait_applied(store, int(total * fraction), [worker])
        worker.kill()
        kills += 1
        assert applied(store) < total, "the stream ended before the kill"
        worker = start_worker(settings, instance_id="w1", batch_size=500, engine=engine)
    wait_applied(store, total, [worker])
    assert kills == 3
    assert applied(store) == total
    # Some kills landed after a commit to Redis and before the offset commit: redelivered, skipped.
    assert store.stats().get(keys.STATS_DUPLICATES, 0) > 0
    assert_matches_offline(store, [*products, *events])


@TOPOLOGIES
def test_workers_join_and_leave_mid_stream(
    settings_factory: Callable[..., Settings], start_worker: MakeWorker, engine: str, topology: str,
    redis_at: RedisAt,
) -> None:
    settings, client = redis_at(topology, settings_factory(partitions=4))
    store = RedisStore(client, settings.features)
    first = start_worker(settings, batch_size=300, engine=engine)
    products = load_catalog(settings, store, first)
    events = list(sessions(SHAPE, 9000))
    total = counted_events(events)
    producer = threading.Thread(target=publish_paced, args=(settings, events, 6.0))
    producer.start()
    wait_applied(store, total // 5, [first])
    second = start_worker(settings, batch_size=300, engine=engine)
    wait_until(lambda: group_size(settings) == 2, 30, what="second worker in the group")
    wait_applied(store, total * 3 // 5, [first, second])
    assert first.stop() == 0  # leaves the group; its partitions move to the second worker
    producer.join()
    wait_applied(store, total, [second])
    assert applied(store) == total
    assert_matches_offline(store, [*products, *events])


def test_a_cluster_primary_killed_under_a_worker_keeps_features_exact(
    settings: Settings, start_worker: MakeWorker, redis_at: RedisAt
) -> None:
    """SIGKILL the primary holding shard 0 mid-stream: its replica takes over (asynchronous
    replication: it may lack the last acknowledged batches, which the worker then replays), the
    worker's commits find the new primary, and nothing is lost or counted twice."""
    settings, client = redis_at("cluster", settings)
    store = RedisStore(client, settings.features)
    worker = start_worker(settings, batch_size=300)
    products = load_catalog(settings, store, worker)
    events = list(sessions(SHAPE, 6000))
    total = counted_events(events)
    producer = threading.Thread(target=publish_paced, args=(settings, events, 8.0))
    producer.start()
    wait_applied(store, total // 4, [worker])
    node = client.nodes_manager.get_node_from_slot(key_slot(keys.stats(store.shards.tag(0)).encode()))
    pid = int((ROOT / "var" / "redis-shards" / str(node.port) / "redis.pid").read_text())
    subprocess.run(["kill", "-9", str(pid)], check=True)
    producer.join()

    def caught_up() -> bool:
        assert worker.alive(), worker.log_tail()
        try:
            return applied(store) >= total
        except redis.RedisError:  # this test's own client, while the replica takes over
            client.nodes_manager.initialize()
            return False

    try:
        wait_until(caught_up, 120, interval=0.2, what="every event applied after the failover")
        assert applied(store) == total
        assert "cluster_slots_refreshed" in worker.log_tail(400), "the worker never met the failover"
        assert_matches_offline(store, [*products, *events])
    finally:  # the killed node comes back as a replica of the one promoted in its place
        subprocess.run([str(ROOT / "infra" / "redis-cluster.sh"), "start"], check=True, timeout=120)


def publish_paced(settings: Settings, events: list[Event], seconds: float) -> None:
    chunks = 20
    size = len(events) // chunks + 1
    for i in range(chunks):
        publish(settings, events[i * size : (i + 1) * size])
        time.sleep(seconds / chunks)


def group_size(settings: Settings) -> int:
    admin = kafka.admin_client(settings)
    group = f"g-{settings.topics.interactions}"
    return len(admin.describe_consumer_groups([group])[group].result().members)


def test_rebuild_after_redis_loss_then_forget(
    settings: Settings, redis_client: redis.Redis, single: RedisStore, start_worker: MakeWorker
) -> None:
    worker = start_worker(settings)
    products = load_catalog(settings, single, worker)
    events = list(sessions(SHAPE, 1500))
    publish(settings, events)
    wait_applied(single, counted_events(events), [worker])
    assert worker.stop() == 0

    redis_client.flushdb()  # Redis lost
    report = rebuild(settings, progress=False)
    assert report.events == counted_events(events) and report.dead_letters == 0
    assert_matches_offline(single, [*products, *events])

    victim = events[0].user_id  # type: ignore[union-attr]
    assert redis_client.exists(keys.user(victim))
    env = environment(settings)
    out = subprocess.run([sys.executable, "-m", "shoprank", "forget", victim], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert "removed" in out.stdout
    assert not redis_client.exists(keys.user(victim))
    late = Click(event_id="late", user_id=victim, session_id="s", product_id="p1",
                 timestamp=events[-1].timestamp)
    publish(settings, [late])
    worker = start_worker(settings)
    wait_applied(single, counted_events(events) + 1, [worker])
    assert not redis_client.exists(keys.user(victim))
    assert worker.stop() == 0
    rebuild(settings, progress=False)  # the tombstone survives a rebuild
    assert not redis_client.exists(keys.user(victim))
    redis_client.flushdb()  # ... and the loss of Redis itself: it is restored from Kafka
    assert rebuild(settings, progress=False).tombstones == 1
    assert not redis_client.exists(keys.user(victim))
    others = {e.user_id for e in events if isinstance(e, Click)} - {victim}  # type: ignore[union-attr]
    assert all(redis_client.exists(keys.user(u)) for u in others)
