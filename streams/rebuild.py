"""Recompute every feature from the retained Kafka log into Redis (after Redis was lost).

Clears the feature keys (tombstones of forgotten shoppers stay, and are restored from the
``forgotten`` topic when Redis lost them too), then reads the catalog topic to
its end, then queries, results and interactions to the ends they had when the rebuild started,
through the same processor as the workers. The partition offsets it records let workers that
resume afterwards skip what the rebuild already applied. Stop the workers while it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from core import kafka
from core.progress import progress as progress_bar
from core.settings import Settings
from features import keys
from features.redis_store import RedisStore, connect
from streams.deadletter import DeadLetters
from streams.forget import restore_tombstones
from streams.processor import Processor, RawRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    records: int
    events: int
    dead_letters: int
    cleared: int
    tombstones: int
    seconds: float


def rebuild(settings: Settings, progress: bool = True) -> RebuildReport:
    started = time.perf_counter()
    store = RedisStore(connect(settings.redis), settings.features, settings.streams)
    cleared = store.clear()
    tombstones = restore_tombstones(settings, store)
    letters = DeadLetters()  # already published when first consumed: count, do not republish
    processor = Processor(settings, store, letters.note_all)
    consumer = kafka.consumer(settings, group_id=f"{settings.streams.group_id}-rebuild")
    t = settings.topics
    records = 0
    try:
        for phase in ([t.catalog], [t.queries, t.results, t.interactions]):
            records += _replay(consumer, phase, processor, settings.streams.batch_size, progress)
    finally:
        consumer.close()
    applied = store.stats().get(keys.STATS_APPLIED, 0)
    report = RebuildReport(records, applied, letters.count, cleared, tombstones,
                           time.perf_counter() - started)
    log.info("rebuild_done", records=report.records, events=report.events,
             dead_letters=report.dead_letters, tombstones=tombstones, seconds=round(report.seconds, 2))
    return report


def _replay(consumer: Consumer, topics: list[str], processor: Processor, batch: int,
            progress: bool) -> int:
    marks = kafka.watermarks(consumer, topics)
    ends = {tp: high for tp, (_, high) in marks.items()}
    starts = [TopicPartition(t, p, low) for (t, p), (low, _) in marks.items()]
    total = sum(ends[(tp.topic, tp.partition)] - tp.offset for tp in starts)
    if not starts:
        return 0
    consumer.assign(starts)
    seen = 0
    with progress_bar(total=total, desc=f"rebuild {', '.join(topics)}", unit="ev", enabled=progress) as bar:
        while ends:
            msgs = consumer.consume(num_messages=batch, timeout=0.5)
            raws = []
            for m in msgs:
                if m.error():
                    raise KafkaException(m.error())
                tp = (m.topic(), m.partition())
                end = ends.get(tp)
                if end is None or m.offset() >= end:
                    continue
                raws.append(RawRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value()))
            if raws:
                processor.apply(raws)
                seen += len(raws)
                bar.update(len(raws))
            kafka.drop_reached(consumer, ends)
    consumer.unassign()
    return seen
