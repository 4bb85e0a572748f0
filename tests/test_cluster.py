"""Losing any one process loses nothing: feature workers against replicated Kafka and Redis.

The cluster tests run against ``make up-cluster`` (3 KRaft brokers, Redis primary + replica + 3
Sentinels on their own loopback ports; the settings it wrote to var/cluster.env) and are skipped,
saying so, when it is not up; ``make test`` starts it. They SIGKILL a broker (the one leading
most partitions) and the Redis primary, then compare what the worker left in Redis with the
offline recomputation of the same events (tests/test_streams_worker.py's check).

The first test needs no cluster: it makes Redis lose a worker's last acknowledged writes (what
an asynchronous replica promoted by Sentinel may lack) by restoring an earlier copy of the
database under a running worker, and checks that the worker replays exactly what is missing.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import TopicPartition
from confluent_kafka.admin import ConfigResource

from core import kafka
from core.events import Event, encode
from core.settings import ROOT, KafkaSettings, RedisSettings, Settings, TopicSettings
from core.topics import TOPIC_KEYS, ensure_topics, route, topic_specs
from features import keys
from features.redis_store import RedisStore, connect
from streams.synthetic import sessions
from streams.testing import Worker, dump_db, environment, publish, restore_db, wait_until
from tests.conftest import TEST_REDIS_DB
from tests.test_streams_worker import FEATURES, SHAPE, assert_matches_offline, counted_events, load_catalog

CLUSTER_ENV = ROOT / "var" / "cluster.env"
KAFKA_CLUSTER = str(ROOT / "infra" / "kafka-cluster.sh")
REDIS_CLUSTER = str(ROOT / "infra" / "redis-sentinel.sh")


def cluster_env() -> dict[str, str]:
    """The settings ``make up-cluster`` wrote (empty when it never ran)."""
    if not CLUSTER_ENV.exists():
        return {}
    pairs = (line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cluster_down_reason() -> str | None:
    env = cluster_env()
    if not env:
        return f"the replicated cluster is not up ({CLUSTER_ENV} missing): run `make up-cluster`"
    for script in (KAFKA_CLUSTER, REDIS_CLUSTER):
        if subprocess.run([script, "status"], capture_output=True).returncode != 0:
            return f"the replicated cluster is not up ({Path(script).name} status): run `make up-cluster`"
    return None


_DOWN = cluster_down_reason()


def cluster(test: Callable[..., None]) -> Callable[..., None]:
    """Marked ``cluster`` (``-m "not cluster"`` leaves them out); skipped, saying why, when it is down."""
    return pytest.mark.cluster(pytest.mark.skipif(_DOWN is not None, reason=str(_DOWN))(test))


def applied(client: redis.Redis) -> int:
    try:
        return int(client.hget(keys.STATS, keys.STATS_APPLIED) or 0)
    except redis.ConnectionError:  # a failover under way: not yet
        return -1


def wait_applied(client: redis.Redis, n: int, workers: list[Worker], timeout: float = 120) -> None:
    def done() -> bool:
        if not any(w.alive() for w in workers):
            raise AssertionError("every worker died:\n" + workers[-1].log_tail())
        return applied(client) >= n

    wait_until(done, timeout, what=f"{n} events applied (now {applied(client)})")


def publish_paced(settings: Settings, events: list[Event], seconds: float, chunks: int = 40) -> None:
    size = len(events) // chunks + 1
    for i in range(chunks):
        publish(settings, events[i * size:(i + 1) * size])
        time.sleep(seconds / chunks)


# --- Redis behind its writer (no cluster needed) -------------------------------------------------


def test_a_worker_replays_what_redis_lost_of_its_acknowledged_writes(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    def start() -> Worker:
        return Worker(environment(settings, group_id=f"g-{settings.topics.interactions}", instance_id="w1",
                                  session_timeout_s=6, batch_size=300), tmp_path / "worker.log")

    worker = start()
    try:
        products = load_catalog(settings, RedisStore(redis_client, FEATURES), worker)
        events = list(sessions(SHAPE, 4500))
        third = len(events) // 3
        a, b, c = events[:third], events[third:2 * third], events[2 * third:]
        n_a, n_ab, total = counted_events(a), counted_events(a + b), counted_events(events)
        publish(settings, a)
        wait_applied(redis_client, n_a, [worker])
        earlier = dump_db(redis_client)
        publish(settings, b)
        wait_applied(redis_client, n_ab, [worker])
        # A failover to a replica that had only `earlier`: the worker's next commit finds Redis
        # behind what it wrote, and it replays b before c.
        restore_db(redis_client, earlier)
        assert applied(redis_client) == n_a
        publish(settings, c)
        wait_applied(redis_client, total, [worker])
        assert applied(redis_client) == total
        assert "replaying_from_redis" in worker.log_tail(400)
        assert_matches_offline(RedisStore(redis_client, FEATURES), [*products, *events])

        # The same loss while no worker runs: the group's committed offsets are past what Redis
        # holds, and a starting worker resumes from Redis's, not the group's.
        worker.kill()
        restore_db(redis_client, earlier)
        worker = start()
        wait_applied(redis_client, total, [worker])
        assert applied(redis_client) == total
        assert_matches_offline(RedisStore(redis_client, FEATURES), [*products, *events])
    finally:
        if worker.alive():
            worker.kill()


# --- the replicated cluster ----------------------------------------------------------------------


@pytest.fixture
def cluster_settings() -> Iterator[Settings]:
    """Settings for the cluster: fresh topics (replication factor 3, min ISR 2), this suite's
    Redis database found through the Sentinels, emptied before and after."""
    env = cluster_env()
    tag = uuid.uuid4().hex[:10]
    s = Settings(
        kafka=KafkaSettings(bootstrap_servers=env["SHOPRANK_KAFKA_BOOTSTRAP_SERVERS"]),
        redis=RedisSettings(url=f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
                            sentinels=env["SHOPRANK_REDIS_SENTINELS"],
                            sentinel_master=env["SHOPRANK_REDIS_SENTINEL_MASTER"]),
        topics=TopicSettings(**{k: f"test.{tag}.{k}" for k in TOPIC_KEYS}, partitions=4,
                             replication_factor=3, min_insync_replicas=2),
    )
    ensure_topics(kafka.admin_client(s), topic_specs(s))
    client = connect(s.redis)
    client.flushdb()
    yield s
    client.flushdb()
    admin = kafka.admin_client(s)
    futures = admin.delete_topics([t.name for t in topic_specs(s)], operation_timeout=30)
    for fut in futures.values():
        fut.result()


@pytest.fixture
def cluster_worker(cluster_settings: Settings, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start() -> Worker:
        s = cluster_settings
        env = environment(s, group_id=f"g-{s.topics.interactions}", instance_id="w1", session_timeout_s=6,
                          batch_size=300)
        env |= {"SHOPRANK_REDIS_SENTINELS": str(s.redis.sentinels),
                "SHOPRANK_REDIS_SENTINEL_MASTER": s.redis.sentinel_master}
        w = Worker(env, tmp_path / "worker.log")
        started.append(w)
        return w

    yield start
    for w in started:
        if w.alive():
            w.kill()


def leaders(settings: Settings, topic: str) -> dict[int, int]:
    """Partition -> id of the broker leading it."""
    meta = kafka.admin_client(settings).list_topics(topic, timeout=10).topics[topic]
    return {p: m.leader for p, m in meta.partitions.items()}


def read_all(settings: Settings, topic: str) -> list[bytes]:
    """Every record of ``topic`` now, from its beginning."""
    consumer = kafka.consumer(settings, group_id=f"read-{uuid.uuid4().hex[:8]}")
    try:
        marks = kafka.watermarks(consumer, [topic])
        ends = {tp: high for tp, (_, high) in marks.items()}
        consumer.assign([TopicPartition(t, p, low) for (t, p), (low, _) in marks.items()])
        out: list[bytes] = []
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=0.5):
                if not m.error() and m.offset() < ends.get((m.topic(), m.partition()), 0):
                    out.append(m.value())
            kafka.drop_reached(consumer, ends)
        assert not ends, f"could not read {topic} to its end: {ends}"
        return out
    finally:
        consumer.close()


@cluster
def test_topics_are_replicated_three_times_with_two_in_sync(cluster_settings: Settings) -> None:
    s = cluster_settings
    meta = kafka.admin_client(s).list_topics(s.topics.interactions, timeout=10).topics[s.topics.interactions]
    assert all(len(p.replicas) == 3 and len(p.isrs) == 3 for p in meta.partitions.values())
    admin = kafka.admin_client(s)  # kept: its futures die with it
    res = ConfigResource(ConfigResource.Type.TOPIC, s.topics.interactions)
    configs = admin.describe_configs([res])[res].result()
    assert configs["min.insync.replicas"].value == "2"


@cluster
def test_killing_the_leaders_broker_loses_no_acknowledged_event(
    cluster_settings: Settings, cluster_worker: Callable[[], Worker]
) -> None:
    s = cluster_settings
    client = connect(s.redis)
    worker = cluster_worker()
    products = load_catalog(s, RedisStore(client, FEATURES), worker)
    events = list(sessions(SHAPE, 2500, tag="b"))
    total = counted_events(events)
    acked: list[int] = []
    failed: list[int] = []
    killed = threading.Event()

    def produce() -> None:  # acks=all, idempotent (core.kafka.producer): what the engine sends
        producer = kafka.producer(s)
        for i, ev in enumerate(events):
            topic, key = route(s, ev)

            def done(err: object, _msg: object, i: int = i) -> None:
                (failed if err is not None else acked).append(i)

            producer.produce(topic, encode(ev), key=key.encode(), on_delivery=done)
            producer.poll(0)
            if i % 200 == 199:
                time.sleep(0.1)  # ~2,000 events/s
            if i == len(events) // 2:  # the kill lands mid-stream, however fast the host sends
                # Polling while it waits: delivery reports arrive only through poll(), and the
                # test kills a broker once a quarter of the stream is acknowledged.
                deadline = time.monotonic() + 60
                while not killed.is_set() and time.monotonic() < deadline:
                    producer.poll(0.1)
        assert producer.flush(120) == 0

    sender = threading.Thread(target=produce, daemon=True)
    sender.start()
    wait_until(lambda: len(acked) > len(events) // 4, 60, what="a quarter acknowledged")
    by_broker: dict[int, int] = {}
    for b in leaders(s, s.topics.interactions).values():
        by_broker[b] = by_broker.get(b, 0) + 1
    victim = max(by_broker, key=lambda b: by_broker[b])
    acked_before = len(acked)
    subprocess.run([KAFKA_CLUSTER, "kill-node", str(victim)], check=True, capture_output=True)
    killed.set()
    try:
        sender.join(180)
        assert not sender.is_alive()
        assert acked_before < len(events), "the stream ended before the kill"
        assert not failed and len(acked) == len(events)
        assert victim not in leaders(s, s.topics.interactions).values()
        # Every acknowledged event is in the log, once (idempotence: retries are not duplicated).
        logged = (read_all(s, s.topics.interactions) + read_all(s, s.topics.queries)
                  + read_all(s, s.topics.results))
        assert sorted(logged) == sorted(encode(ev) for ev in events)
        wait_applied(client, total, [worker])
        assert applied(client) == total
        assert_matches_offline(RedisStore(client, FEATURES), [*products, *events])
    finally:
        subprocess.run([KAFKA_CLUSTER, "start-node", str(victim)], check=True, capture_output=True)


def primary_port(settings: Settings) -> int | None:
    """The port of the primary the Sentinels name; None while none is (a failover under way)."""
    try:
        return int(connect(settings.redis).connection_pool.get_master_address()[1])  # type: ignore[attr-defined]
    except redis.ConnectionError:  # MasterNotFoundError: the primary is down, none promoted yet
        return None


@cluster
def test_redis_failover_then_a_worker_kill_keep_features_exact(
    cluster_settings: Settings, cluster_worker: Callable[[], Worker]
) -> None:
    s = cluster_settings
    client = connect(s.redis)
    worker = cluster_worker()
    products = load_catalog(s, RedisStore(client, FEATURES), worker)
    events = list(sessions(SHAPE, 3000, tag="r"))
    total = counted_events(events)
    sender = threading.Thread(target=publish_paced, args=(s, events, 12.0), daemon=True)
    sender.start()
    wait_applied(client, total // 4, [worker])
    old = primary_port(s)
    assert old is not None
    subprocess.run([REDIS_CLUSTER, "kill-node", str(old)], check=True, capture_output=True)
    try:
        wait_until(lambda: primary_port(s) not in (None, old), 30, interval=0.2,
                   what="Sentinel promotes the replica")
        wait_applied(client, total * 3 // 5, [worker])
        assert applied(client) < total, "the stream ended before the worker kill"
        worker.kill()
        worker = cluster_worker()
        sender.join(60)
        wait_applied(client, total, [worker])
        assert applied(client) == total
        assert_matches_offline(RedisStore(client, FEATURES), [*products, *events])
    finally:
        subprocess.run([REDIS_CLUSTER, "start-node", str(old)], check=True, capture_output=True)
    # The former primary rejoins as a replica of the promoted one.
    old_client = redis.Redis(host="127.0.0.1", port=old)
    wait_until(lambda: old_client.role()[0] == b"slave", 30, interval=0.2, what=f"{old} a replica again")
