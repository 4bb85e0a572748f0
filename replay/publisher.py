"""Publish a :class:`~replay.to_events.Replay` into Kafka: the catalog first, then every event in
timestamp order, as fast as the broker takes them or at ``speed`` times real time.

Ids are stable (derived from the rows, see :mod:`replay.to_events`), so replaying twice publishes
the same ids and idempotent consumers recognise what they have seen; each message also carries
its id in the ``event_id`` header. Kafka message timestamps are left to the producer (now): the
event time lives in the payload, and 2011 timestamps would make the broker's time-based
retention delete the data at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from confluent_kafka import KafkaError, Message, Producer

from core import kafka
from core.events import encode
from core.progress import Progress
from core.progress import progress as progress_bar
from core.settings import Settings
from core.topics import route
from replay.to_events import Replay, TimedEvent

log = structlog.get_logger(__name__)

POLL_EVERY = 1000
FLUSH_TIMEOUT_S = 60.0


class ReplayError(RuntimeError):
    """Some events were not acknowledged by the broker; the message says how many and why."""


@dataclass(frozen=True)
class ReplayStats:
    catalog: int
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return (self.catalog + self.events) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Deliveries:
    """Counts failed deliveries (librdkafka reports them on ``poll``/``flush``)."""

    failed: int = 0
    first_error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed += 1
            self.first_error = self.first_error or err


@dataclass
class Pacer:
    """Holds each event back until ``(event time - first event time) / speed`` has passed.

    ``speed=None`` means as fast as possible; ``speed=11088`` plays eleven weeks in ten minutes.
    """

    speed: float | None
    origin: datetime | None = None
    started: float = field(default_factory=time.monotonic)

    def delay_s(self, ts: datetime) -> float:
        """Seconds to wait before ``ts`` is due (0 when due or when unpaced)."""
        if self.speed is None:
            return 0.0
        if self.origin is None:
            self.origin, self.started = ts, time.monotonic()
        due = self.started + (ts - self.origin).total_seconds() / self.speed
        return max(0.0, due - time.monotonic())


def publish(
    settings: Settings, replay: Replay, *, speed: float | None = None, progress: bool = True
) -> ReplayStats:
    """Publish the catalog (flushed before anything else), then the events in timestamp order."""
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0 (or None for as fast as possible), got {speed}")
    producer, deliveries = kafka.producer(settings), _Deliveries()
    started = time.monotonic()
    with progress_bar(total=len(replay.catalog) + len(replay.events), desc="publish", unit="ev",
                      enabled=progress) as bar:
        _send(producer, settings, replay.catalog, deliveries, bar, Pacer(None))
        _flush(producer, deliveries)
        _send(producer, settings, replay.events, deliveries, bar, Pacer(speed))
        _flush(producer, deliveries)
    stats = ReplayStats(len(replay.catalog), len(replay.events), time.monotonic() - started)
    log.info("replay_published", catalog=stats.catalog, events=stats.events,
             seconds=round(stats.seconds, 3), events_per_s=round(stats.events_per_s))
    return stats


def _send(
    producer: Producer,
    settings: Settings,
    events: Sequence[TimedEvent],
    deliveries: _Deliveries,
    bar: Progress,
    pacer: Pacer,
) -> None:
    for i, ev in enumerate(events, 1):
        # poll() returns as soon as it serves a delivery report, so wait until the event is due.
        while (wait := pacer.delay_s(ev.timestamp)) > 0:
            producer.poll(wait)
        _produce(producer, settings, ev, deliveries)
        if i % POLL_EVERY == 0:
            producer.poll(0)
            bar.update(POLL_EVERY)
    bar.update(len(events) % POLL_EVERY)


def _produce(producer: Producer, settings: Settings, ev: TimedEvent, deliveries: _Deliveries) -> None:
    topic, key = route(settings, ev.event)
    value = encode(ev.event)
    headers = [("event_id", ev.event_id.encode())]
    while True:
        try:
            producer.produce(topic, value=value, key=key.encode(), headers=headers, on_delivery=deliveries)
            return
        except BufferError:  # the local queue is full: let librdkafka drain it
            producer.poll(0.05)


def _flush(producer: Producer, deliveries: _Deliveries) -> None:
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    if remaining or deliveries.failed:
        raise ReplayError(
            f"{deliveries.failed} events failed and {remaining} were still unacknowledged after "
            f"{FLUSH_TIMEOUT_S:.0f}s; first error: {deliveries.first_error}"
        )
