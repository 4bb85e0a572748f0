"""Replaying real Best Buy events into the real broker: order, keys, ids, repeat, pacing."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from core import events, kafka
from core.settings import Settings
from replay.publisher import Pacer, publish
from replay.to_events import Replay, bestbuy_replay

SLICE = 3000


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    key: str
    event_id: str
    event: events.Event
    sent_ms: int  # the message's timestamp: when the producer sent it (the replay sets none)


@pytest.fixture(scope="module")
def full_replay() -> Replay:
    return bestbuy_replay(Settings().data_dir)


def read_all(settings: Settings, topics: list[str], expected: int, timeout_s: float = 60.0) -> list[Received]:
    """Every message of ``topics`` from the beginning, in offset order per partition."""
    consumer = kafka.consumer(settings, group_id=f"test-replay-{uuid.uuid4().hex[:8]}")
    try:
        meta = consumer.list_topics(timeout=10)
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions]
        consumer.assign(parts)
        got: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                if msg.error():
                    raise RuntimeError(msg.error())
                headers = dict(msg.headers() or [])
                got.append(Received(msg.topic(), msg.partition(), msg.key().decode(),
                                    headers["event_id"].decode(), events.ANY.decode(msg.value()),
                                    msg.timestamp()[1]))
        return got
    finally:
        consumer.close()


def event_time(e: events.Event) -> datetime:
    return e.updated_at if isinstance(e, events.CatalogProduct) else e.timestamp  # type: ignore[union-attr]


def test_replay_publishes_in_order_with_stable_ids(settings: Settings, full_replay: Replay) -> None:
    sliced = replace(full_replay, events=full_replay.events[:SLICE])
    stats = publish(settings, sliced, progress=False)
    assert (stats.catalog, stats.events) == (437, SLICE)
    assert stats.events_per_s > 0

    t = settings.topics
    catalog = read_all(settings, [t.catalog], 437)
    assert sorted(r.key for r in catalog) == sorted(e.key for e in sliced.catalog)
    assert all(r.key == r.event_id == r.event.product_id for r in catalog)  # type: ignore[union-attr]

    got = read_all(settings, [t.queries, t.interactions], SLICE)
    assert sorted(r.event_id for r in got) == sorted(e.event_id for e in sliced.events)
    by_partition: dict[tuple[str, int], list[Received]] = defaultdict(list)
    for r in got:
        assert r.key == r.event.user_id  # type: ignore[union-attr]
        by_partition[(r.topic, r.partition)].append(r)
    assert len(by_partition) == 4  # two topics, two partitions each: the keys spread
    for rows in by_partition.values():
        times = [event_time(r.event) for r in rows]
        assert times == sorted(times)  # each partition holds its events in timestamp order
    expected = {e.event_id: e.event for e in sliced.events}
    assert all(r.event == expected[r.event_id] for r in got)

    # A second replay publishes the very same ids, so consumers can recognise it.
    publish(settings, sliced, progress=False)
    twice = read_all(settings, [t.queries, t.interactions], 2 * SLICE)
    assert len(twice) == 2 * SLICE
    for (topic, partition), first in by_partition.items():
        both = [r.event_id for r in twice if (r.topic, r.partition) == (topic, partition)]
        assert both == [r.event_id for r in first] * 2


def test_speed_factor_paces_the_replay_in_event_time(settings: Settings, full_replay: Replay) -> None:
    sliced = replace(full_replay, catalog=[], events=full_replay.events[:200])
    t0 = sliced.events[0].timestamp
    span_s = (sliced.events[-1].timestamp - t0).total_seconds()
    speed = span_s / 1.5  # the slice's hours of traffic in 1.5 s
    publish(settings, sliced, speed=speed, progress=False)
    t = settings.topics
    sent = {r.event_id: r.sent_ms / 1000 for r in read_all(settings, [t.queries, t.interactions], 200)}
    first = min(sent.values())  # the first event is due at once
    # Each event is sent when its event time, scaled by the speed, has passed since the first's.
    due = {e.event_id: (e.timestamp - t0).total_seconds() / speed for e in sliced.events}
    lags = sorted(sent[i] - first - due[i] for i in due)
    assert len(lags) == 200 and {e.timestamp for e in sliced.events} != {t0}
    assert lags[0] >= -0.005  # never before it is due (message timestamps are in ms)
    assert lags[len(lags) // 2] < 0.25  # nor held back: sent as it falls due


def test_pacer_waits_until_an_event_is_due() -> None:
    t0 = datetime(2011, 8, 11, tzinfo=UTC)
    pacer = Pacer(speed=3600.0)  # an hour a second
    assert pacer.delay_s(t0) == 0.0
    assert pacer.delay_s(t0 + timedelta(hours=2)) == pytest.approx(2.0, abs=0.05)
    assert Pacer(speed=None).delay_s(t0 + timedelta(days=9)) == 0.0


def test_speed_must_be_positive(settings: Settings, full_replay: Replay) -> None:
    with pytest.raises(ValueError, match="speed"):
        publish(settings, replace(full_replay, catalog=[], events=[]), speed=0.0, progress=False)
