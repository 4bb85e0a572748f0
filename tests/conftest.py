"""Fixtures for tests against the real Kafka broker and the real Redis server (``make up``).

Nothing is mocked: a test that cannot reach the broker or Redis fails. Each test gets its own
topics (unique names, deleted afterwards) and its own Redis database, so tests do not see the
demo's data or each other's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from core import kafka
from core.settings import RedisSettings, Settings, TopicSettings
from core.topics import TOPIC_KEYS, ensure_topics, topic_specs

# Another database for a second suite running beside this one on the same Redis.
TEST_REDIS_DB = int(os.environ.get("SHOPRANK_TEST_REDIS_DB", "15"))
# The Redis Cluster of `make up-redis-cluster` (a cluster has one database: tests empty it).
TEST_REDIS_CLUSTER_URL = os.environ.get("SHOPRANK_TEST_REDIS_CLUSTER_URL", "redis://127.0.0.1:17000/0")


@pytest.fixture
def settings_factory() -> Iterator[Callable[..., Settings]]:
    """Settings whose topics are fresh, uniquely named, created on the real broker."""
    made: list[Settings] = []

    def make(partitions: int = 2) -> Settings:
        tag = uuid.uuid4().hex[:10]
        topics = TopicSettings(**{k: f"test.{tag}.{k}" for k in TOPIC_KEYS}, partitions=partitions)
        base = Settings()
        url = base.redis.url.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}"
        s = Settings(topics=topics, redis=RedisSettings(url=url))
        ensure_topics(kafka.admin_client(s), topic_specs(s))
        made.append(s)
        return s

    yield make
    for s in made:
        admin = kafka.admin_client(s)
        futures = admin.delete_topics([t.name for t in topic_specs(s)], operation_timeout=30)
        for fut in futures.values():
            fut.result()


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """The real Redis, on a database of its own, emptied before and after the test."""
    client = redis.Redis.from_url(settings.redis.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def redis_cluster_url() -> str:
    return TEST_REDIS_CLUSTER_URL


@pytest.fixture
def redis_cluster(redis_cluster_url: str) -> Iterator[RedisCluster]:
    """The real Redis Cluster (``make up-redis-cluster``), emptied before and after the test."""
    client = RedisCluster.from_url(redis_cluster_url)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client.close()


#: The owner shards of the feature state in tests on the Redis Cluster (two per primary).
CLUSTER_SHARDS = 6
RedisAt = Callable[[str, Settings], tuple[Settings, "redis.Redis | RedisCluster"]]


@pytest.fixture
def redis_at(request: pytest.FixtureRequest) -> RedisAt:
    """``(topology, settings)`` -> the settings and the client of a test's Redis: ``"single"``,
    the test database of one server; ``"cluster"``, the Redis Cluster with the feature state in
    :data:`CLUSTER_SHARDS` owner shards (processes started with these settings get both through
    ``streams.testing.environment``)."""

    def at(topology: str, settings: Settings) -> tuple[Settings, redis.Redis | RedisCluster]:
        if topology == "single":
            return settings, request.getfixturevalue("redis_client")
        client = request.getfixturevalue("redis_cluster")
        return settings.model_copy(update={
            "redis": settings.redis.model_copy(update={"url": request.getfixturevalue("redis_cluster_url"),
                                                       "cluster": True}),
            "features": settings.features.model_copy(update={"shards": CLUSTER_SHARDS})}), client

    return at
