"""Kafka clients built from settings (confluent-kafka / librdkafka), so every part connects alike."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.processes import wait_until
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


# Errors of a partition whose leader is changing (librdkafka does not always flag them retriable).
_LEADER_MOVING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                            KafkaError._TIMED_OUT, KafkaError._TRANSPORT})


def watermarks(consumer: Consumer, topics: Iterable[str], timeout_s: float = 10.0
               ) -> dict[tuple[str, int], tuple[int, int]]:
    """(low, high) offsets of every non-empty partition of ``topics``, as they are now. A
    partition whose leadership is moving (a broker restarted: NOT_LEADER_FOR_PARTITION) is asked
    again until ``timeout_s`` has passed."""
    out = {}
    deadline = time.monotonic() + timeout_s
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        if meta.error is not None:
            raise KafkaException(meta.error)
        for p in meta.partitions:
            while True:
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                    break
                except KafkaException as exc:
                    err = exc.args[0]
                    if not (err.retriable() or err.code() in _LEADER_MOVING) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            if high > low:
                out[topic, p] = (low, high)
    return out


def drop_reached(consumer: Consumer, ends: dict[tuple[str, int], int]) -> None:
    """Remove the partitions whose position has reached their end from ``ends``. Positions, not
    the offsets of records seen: compaction leaves gaps, so the last offset may never be read."""
    for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
        if tp.offset >= ends[(tp.topic, tp.partition)]:
            del ends[(tp.topic, tp.partition)]


def send_acked(producer: Producer, topic: str, messages: Iterable[tuple[bytes | None, bytes | None,
               list[tuple[str, bytes]] | None]], timeout_s: float = 30.0,
               partition: int | None = None) -> None:
    """Produce ``(key, value, headers)`` messages (to ``partition`` when given, else by key) and
    return once the broker has acknowledged every one; raise if any failed or is still
    unacknowledged after ``timeout_s``."""
    failed: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failed.append(err)

    n = 0
    where = {} if partition is None else {"partition": partition}
    for key, value, headers in messages:
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered, **where)
        n += 1
    remaining = producer.flush(timeout_s)
    if remaining or failed:
        raise RuntimeError(f"{topic}: {remaining} of {n} messages unacknowledged after {timeout_s:.0f} s, "
                           f"{len(failed)} failed{f': {failed[0]}' if failed else ''}")


def is_fatal(err: KafkaError) -> bool:
    """Whether an error left the client unusable. A consumer's fatal error reaches the caller as a
    message whose error code is _FATAL, while that error object itself may not say fatal()."""
    return err.fatal() or err.code() == KafkaError._FATAL


def wait_for_groups(settings: Settings, topic: str, timeout_s: float = 180.0) -> float:
    """Block until consumer groups work: a throwaway group commits an offset of ``topic``. On a
    fresh cluster the first commit creates ``__consumer_offsets`` and waits while its partitions
    load ("coordinator load in progress"); a worker started before that sat a minute without its
    partitions. Returns the seconds waited."""
    started = time.monotonic()
    probe = consumer(settings, group_id="shoprank-ready-probe")

    def committed() -> bool:
        try:
            probe.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
            return True
        except KafkaException:
            return False

    try:
        wait_until(committed, timeout_s, interval=0.5, what="consumer groups served (an offset commit)")
    finally:
        probe.close()
    return time.monotonic() - started
