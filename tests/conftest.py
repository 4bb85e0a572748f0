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

from core import kafka
from core.settings import RedisSettings, Settings, TopicSettings
from core.topics import TOPIC_KEYS, ensure_topics, topic_specs

# Another database for a second suite running beside this one on the same Redis.
TEST_REDIS_DB = int(os.environ.get("SHOPRANK_TEST_REDIS_DB", "15"))


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
