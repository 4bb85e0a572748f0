"""A broker restart keeps a topic's data: storage lives in var/kafka and is formatted only once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from confluent_kafka import TopicPartition

from core import kafka
from core.settings import Settings

KAFKA_SH = Path(__file__).resolve().parent.parent / "infra" / "kafka.sh"


def _read_all(settings: Settings, topic: str, expected: int) -> list[bytes]:
    consumer = kafka.consumer(settings, group_id=f"restart-{topic}")
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.topics.partitions)])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.25)
            if msg is not None and msg.error() is None:
                values.append(msg.value())
    finally:
        consumer.close()
    return values


def test_broker_restart_keeps_topic_data(settings: Settings) -> None:
    topic = settings.topics.interactions
    payloads = [f"event-{i}".encode() for i in range(500)]
    producer = kafka.producer(settings)
    for i, value in enumerate(payloads):
        producer.produce(topic, key=str(i % 7).encode(), value=value)
    assert producer.flush(30) == 0
    del producer

    subprocess.run([str(KAFKA_SH), "stop"], check=True)
    subprocess.run([str(KAFKA_SH), "start"], check=True)

    assert sorted(_read_all(settings, topic, len(payloads))) == sorted(payloads)
