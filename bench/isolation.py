"""Settings for a benchmark run of its own: fresh, uniquely named topics and one Redis database."""

from __future__ import annotations

import uuid

from core.settings import RedisSettings, Settings, TopicSettings
from core.topics import TOPIC_KEYS


def isolated_settings(redis_db: int) -> Settings:
    """Topics named ``bench.<tag>.<kind>`` (create them with core.topics) and Redis ``/redis_db``."""
    base = Settings()
    tag = uuid.uuid4().hex[:8]
    names = {k: f"bench.{tag}.{k}" for k in TOPIC_KEYS}
    url = base.redis.url.rsplit("/", 1)[0] + f"/{redis_db}"
    return Settings(topics=TopicSettings(**names, partitions=base.topics.partitions),
                    redis=RedisSettings(url=url))
