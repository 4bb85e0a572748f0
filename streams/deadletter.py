"""The one place bad input goes: the dead-letter topic, a counter and a log line.

An event that fails validation, or names a product the catalog does not know, is published with
its original bytes and key to the dead-letter topic, with headers ``reason``, ``source_topic``,
``source_partition`` and ``source_offset``; the worker goes on with the rest of the batch. Dead
letters are acknowledged by the broker before their batch is committed to Redis (whose partition
offsets then count them as done), so nothing is lost; a crash in between may publish one twice
(the headers identify the original).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from core import kafka
from core.settings import Settings
from streams import metrics

log = structlog.get_logger(__name__)

DLQ_FLUSH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str

    @property
    def kind(self) -> str:
        return "unknown_product" if self.reason.startswith("unknown product_id") else "invalid"

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("reason", self.reason.encode()),
            ("source_topic", self.topic.encode()),
            ("source_partition", str(self.partition).encode()),
            ("source_offset", str(self.offset).encode()),
        ]


Publish = Callable[[DeadLetter], Awaitable[None]]


class DeadLetters:
    """Counts and logs every dead letter; publishes it when given a ``publish`` coroutine (the
    worker), not when replaying history (``rebuild``: it was published when first consumed)."""

    def __init__(self, publish: Publish | None = None, *, publishes: bool | None = None) -> None:
        self._publish = publish
        # Whether the letters reach the topic (through ``publish`` or a caller that sends them).
        self.publishes = publish is not None if publishes is None else publishes
        self.count = 0

    def note(self, letter: DeadLetter) -> None:
        self.count += 1
        metrics.DEAD_LETTERS.labels(letter.topic, letter.kind).inc()
        metrics.EVENTS.labels(letter.topic, "dead_letter").inc()
        log.warning(
            "dead_letter",
            topic=letter.topic,
            partition=letter.partition,
            offset=letter.offset,
            reason=letter.reason,
            published=self.publishes,
        )

    def note_all(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            self.note(letter)

    async def send(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            self.note(letter)
            if self._publish is not None:
                await self._publish(letter)


class DeadLetterPublisher:
    """Publishes a batch's dead letters synchronously (the batch engine's ``handover``): returns
    once the broker has acknowledged them all, raises if it has not."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topics.dead_letter
        self.producer = kafka.producer(settings, **{"linger.ms": 0})
        self.notes = DeadLetters(publishes=True)

    def __call__(self, letters: list[DeadLetter]) -> None:
        self.notes.note_all(letters)
        kafka.send_acked(self.producer, self.topic,
                         [(letter.key, letter.value, letter.headers()) for letter in letters],
                         DLQ_FLUSH_TIMEOUT_S)
