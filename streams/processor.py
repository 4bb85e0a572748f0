"""From raw Kafka records to one atomic feature-store commit, plus the dead letters of the batch.

Faust-free, so the worker, ``rebuild`` and the benchmark share it. Redis being unreachable is
retried twice over. Each command retries on the client (:func:`features.redis_store.connect`:
seconds at most), then the whole batch is retried here, forever, with backoff: a batch is
never acknowledged before it is in Redis, so an outage longer than the client's retries holds
the worker back instead of crashing it (or losing the batch). The batch is re-read and
re-planned each time: a commit cut off mid-flight may have run, and its guards and markers make
the second commit a no-op or a re-plan.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core import events
from core.events import InvalidEvent
from core.settings import Settings
from features.plan import Record, Source
from features.redis_store import RedisStore
from features.store import OnRejected, Outcome
from streams import metrics
from streams.deadletter import DeadLetter

log = structlog.get_logger(__name__)


class RawRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def codecs(settings: Settings) -> dict[str, events.Codec[Any]]:
    """The contract each consumed topic carries."""
    t = settings.topics
    return {
        t.catalog: events.CATALOG,
        t.queries: events.QUERIES,
        t.results: events.RESULTS,
        t.interactions: events.INTERACTIONS,
    }


Handover = Callable[[list[DeadLetter]], None]
# 0.05 s, 0.1 s, ... 5 s between attempts at a batch while Redis is unreachable, without end.
_UNAVAILABLE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.025)


@dataclass(frozen=True)
class Decoded:
    """A batch after decoding: valid records (catalog updates first), where each came from, and
    the dead letters of what failed validation."""

    records: list[Record]
    origins: list[RawRecord]
    letters: list[DeadLetter]


class Processor:
    """``handover`` takes a batch's dead letters and returns once they are safe (published and
    acknowledged): it is called before the batch is committed to Redis, whose partition offsets
    would otherwise make a redelivered bad record look already done.

    :meth:`decode` and :meth:`commit` are separate so a worker can decode the next batch while
    Redis runs this one's commit script."""

    def __init__(self, settings: Settings, store: RedisStore, handover: Handover) -> None:
        self.store = store
        self.codecs = codecs(settings)
        self.catalog_topic = settings.topics.catalog
        self.handover = handover
        # Per partition, the highest offset this processor committed to Redis. When set (the
        # batch worker), a commit finding Redis below it raises StateBehind instead of writing:
        # after a failover that dropped acknowledged writes, the worker replays from Redis.
        self.floors: dict[tuple[str, int], int] | None = None

    def decode(self, raws: list[RawRecord]) -> Decoded:
        """Decode and validate. Catalog records go first (each partition keeps its order), so a
        click in the same batch as its product's first catalog record is not dead-lettered."""
        records, origins, letters = [], [], []
        ordered = raws
        if len(raws) > 1 and any(r.topic == self.catalog_topic for r in raws):
            ordered = sorted(raws, key=lambda r: r.topic != self.catalog_topic)
        for raw in ordered:
            try:
                if raw.value is None:
                    raise InvalidEvent("empty record (null value)")
                ev = self.codecs[raw.topic].decode(raw.value)
            except InvalidEvent as exc:
                letters.append(_letter(raw, exc.reason))
                continue
            records.append(Record(ev, Source(raw.topic, raw.partition, raw.offset)))
            origins.append(raw)
        return Decoded(records, origins, letters)

    def apply(self, raws: list[RawRecord]) -> int:
        """Decode and commit a batch; returns how many dead letters it had."""
        return self.commit(self.decode(raws))

    def commit(self, batch: Decoded) -> int:
        """Apply a decoded batch, handing its dead letters (invalid, or naming an unknown
        product) over first; returns how many there were."""
        started = time.perf_counter()
        letters, origins = list(batch.letters), batch.origins
        if letters:
            self.handover(letters)
        if batch.records:

            def hand_over(rejected: list[tuple[int, str]]) -> None:
                unknown = [_letter(origins[i], reason) for i, reason in rejected]
                letters.extend(unknown)
                self.handover(unknown)

            outcome = self._apply_with_retry(batch.records, hand_over)
            if self.floors is not None:
                for r in origins:
                    if r.offset > self.floors.get((r.topic, r.partition), -1):
                        self.floors[r.topic, r.partition] = r.offset
            _count(origins, outcome)
            _count_unknown(outcome)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return len(letters)

    def _apply_with_retry(self, records: list[Record], on_rejected: OnRejected) -> Outcome:
        def attempt() -> Outcome:
            conflicts = self.store.conflicts
            outcome = self.store.apply_batch(records, on_rejected, self.floors)
            metrics.CONFLICTS.inc(self.store.conflicts - conflicts)
            return outcome

        # retries=-1: forever. Retry's default errors: redis' ConnectionError and TimeoutError.
        forever = Retry(_UNAVAILABLE_BACKOFF, -1)
        return forever.call_with_retry(attempt, _unavailable, with_failure_count=True)


def _unavailable(exc: Exception, failures: int) -> None:
    metrics.REDIS_UNAVAILABLE.inc()
    log.warning("redis_unavailable", error=str(exc), failures=failures,
                retry_in_s=_UNAVAILABLE_BACKOFF.compute(failures))


def _count(origins: list[RawRecord], outcome: Outcome) -> None:
    """Applied and duplicate events by source topic (dead letters are counted where noted)."""
    not_applied = {i for i, _ in outcome.rejected}
    skipped = set(outcome.skipped)
    counts: Counter[tuple[str, str]] = Counter()
    for i, raw in enumerate(origins):
        if i in skipped:
            counts[raw.topic, "duplicate"] += 1
        elif i not in not_applied:
            counts[raw.topic, "applied"] += 1
    for (topic, outcome_name), n in counts.items():
        metrics.EVENTS.labels(topic, outcome_name).inc(n)


def _count_unknown(outcome: Outcome) -> None:
    """Products shown that the catalog does not know: counted and logged, their results kept."""
    if not outcome.unknown_impressions:
        return
    n = sum(len(ids) for _, ids in outcome.unknown_impressions)
    metrics.UNKNOWN_IMPRESSIONS.inc(n)
    log.info("unknown_impressions", count=n, results=len(outcome.unknown_impressions),
             query_ids=[q for q, _ in outcome.unknown_impressions[:5]],
             product_ids=sorted({p for _, ids in outcome.unknown_impressions for p in ids})[:10])


def _letter(raw: RawRecord, reason: str) -> DeadLetter:
    return DeadLetter(raw.topic, raw.partition, raw.offset, raw.key, raw.value, reason)
