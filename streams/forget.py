"""Forgetting a shopper, durably: the request goes to a compacted topic, then to Redis.

``forget`` publishes ``user_id -> forgotten-at`` (epoch seconds) to the ``forgotten`` topic and
waits for the broker's acknowledgement, then removes the shopper's features and leaves a
tombstone in Redis, which makes workers ignore the shopper's events up to that time (late and
replayed ones included). ``rebuild`` reads the topic back first, so the tombstones outlive the
loss of Redis itself. The events stay in Kafka under their topics' retention: erasing them there
is the retention policy's job, not this command's.
"""

from __future__ import annotations

import structlog
from confluent_kafka import KafkaException, TopicPartition

from core import kafka
from core.logs import hash_user
from core.settings import Settings
from features.redis_store import RedisStore

log = structlog.get_logger(__name__)

TIMEOUT_S = 30.0


def forget(settings: Settings, store: RedisStore, user_id: str, at: float) -> None:
    kafka.send_acked(kafka.producer(settings, **{"linger.ms": 0}), settings.topics.forgotten,
                     [(user_id.encode(), repr(at).encode(), None)], TIMEOUT_S)
    store.forget(user_id, at)
    log.info("shopper_forgotten", user=hash_user(user_id), at=at)


def restore_tombstones(settings: Settings, store: RedisStore) -> int:
    """Re-apply every ``forget`` request kept in the topic; returns how many."""
    topic = settings.topics.forgotten
    consumer = kafka.consumer(settings, group_id=f"{settings.streams.group_id}-forgotten")
    try:
        ends = {tp: high for tp, (_, high) in kafka.watermarks(consumer, [topic], TIMEOUT_S).items()}
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        latest: dict[str, float] = {}
        while ends:
            for m in consumer.consume(1000, timeout=1.0):
                if m.error():
                    raise KafkaException(m.error())
                if m.key() is not None and m.value() is not None:
                    user_id, at = m.key().decode(), float(m.value())
                    latest[user_id] = max(at, latest.get(user_id, at))
            kafka.drop_reached(consumer, ends)
    finally:
        consumer.close()
    for user_id, at in latest.items():
        store.forget(user_id, at)
    return len(latest)
