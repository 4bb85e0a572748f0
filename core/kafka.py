"""Kafka clients built from settings (confluent-kafka / librdkafka), so every part connects alike."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from core.settings import Settings


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka.librdkafka())


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer: a retried send is written once, in order, per partition."""
    conf = settings.kafka.librdkafka() | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    return Producer(conf | overrides)


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer that commits only what the caller says it has processed."""
    conf = settings.kafka.librdkafka() | {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    return Consumer(conf | overrides)
