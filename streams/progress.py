"""How far the engine's stream jobs have applied their inputs, against the broker's ends.

A replay that must not run ahead of the engine (each search ranked only once every click before it
is in Redis) or a benchmark pausing at a boundary asks here: the feature workers record, beside
the state each commit wrote, the last Kafka offset applied per input partition
(``features.keys.offset``), the joiner its own per partition (``features.keys.join_offsets``)
and its outbox of lists not yet published.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from confluent_kafka import Consumer, TopicPartition

from features import keys
from features.keys import Shards
from features.redis_store import Client, stored_offsets


class Ends:
    """The end offsets of ``topics``' partitions, as often as asked: the partitions are listed
    once (a metadata request costs tens of ms on a busy broker, a watermark request ~0.2 ms)."""

    def __init__(self, consumer: Consumer, topics: Sequence[str], timeout_s: float = 10.0) -> None:
        self.consumer = consumer
        self.timeout_s = timeout_s
        self.partitions = [TopicPartition(t, p) for t in topics
                           for p in consumer.list_topics(t, timeout=timeout_s).topics[t].partitions]

    def now(self) -> dict[tuple[str, int], int]:
        """The end offset of every non-empty partition."""
        out = {}
        for tp in self.partitions:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
            if high > low:
                out[tp.topic, tp.partition] = high
        return out


def features_reached(client: Client, ends: dict[tuple[str, int], int], shards: int) -> bool:
    """Whether the feature workers' effects in Redis reach ``ends`` (every record before each
    partition's end offset applied), in every owner shard (``FeatureSettings.shards``)."""
    if not ends:
        return True
    applied = stored_offsets(client, Shards(shards), list(ends))
    return all(tp in applied and applied[tp] >= end - 1 for tp, end in ends.items())


def applied_up_to(client: Client, ends: dict[tuple[str, int], int], shards: int, timeout_s: float = 120.0,
                  poll_s: float = 0.001) -> None:
    """Wait until :func:`features_reached` ``ends``; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not features_reached(client, ends, shards):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the feature workers did not apply up to {ends} within {timeout_s} s")
        time.sleep(poll_s)


def joiner_reached(client: redis.Redis, ends: dict[tuple[str, int], int], partitions: int) -> bool:
    """Whether the joiner has applied its inputs up to ``ends`` and published its outbox."""
    pipe = client.pipeline(transaction=False)
    for t, p in ends:
        pipe.hget(keys.join_offsets(p), t)
    for p in range(partitions):
        pipe.xlen(keys.join_outbox(p))
    got = pipe.execute()
    offsets, outboxes = got[:len(ends)], got[len(ends):]
    return (all(v is not None and int(v) >= end - 1 for end, v in zip(ends.values(), offsets, strict=True))
            and not any(outboxes))
