"""The feature worker's default engine: librdkafka batch consumption, decode and commit overlapped.

Why not faust's agents: faust hands events to an agent one at a time (aiokafka record -> faust
event -> channel -> stream -> ack), which on this project's 2-core reference machine peaks near
12,700 events/s with agents that only count (``bench.streams --noop``), below the 20,000 a worker
must sustain. Here librdkafka fetches in C and hands over up to ``batch_size`` messages per call.

Two threads, so Python work overlaps Redis's:

- the consumer thread polls, decodes a batch (:meth:`Processor.decode`) and queues it (at most
  two batches ahead: backpressure), and commits to Kafka the offsets the applier has finished;
- the applier thread reads, plans and commits each batch to Redis (:meth:`Processor.commit`);
  while it waits for the commit script, the consumer thread decodes the next batch.

Shopper events wait for the catalog: at start, a worker pauses its shopper-event partitions until
the group has committed every catalog partition up to the end it had when the worker started (a
catalog record is committed only once it is in Redis), so a backlog's clicks are not
dead-lettered for naming products whose catalog records were simply not read yet.

Delivery is at least once and the effect exactly once, as with the faust engine: offsets reach
Kafka only after their batch is in Redis, and the partition offsets the commit script stores
make any redelivered record a no-op. When partitions are revoked (a worker joins or leaves), the
queue is drained and the finished offsets are committed before they are handed over; a worker
killed at any moment leaves Redis with whole batches only.

Redis failover (replicated Redis, Sentinel): replication is asynchronous, so a promoted replica
may lack the last batches the primary acknowledged, their partition offsets included. The
worker remembers the highest offset it committed per partition; a commit that reads a lower one
in Redis (in the same read its guards check) writes nothing and raises StateBehind: the queued
batches are dropped and every assigned partition is sought back to the offset after the one
Redis holds, so exactly what the replica lacks is applied again. A worker that starts after such
a loss resumes from Redis's offset when it is below the group's committed one.
"""

from __future__ import annotations

import gc
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core import kafka
from core.settings import Settings
from features.redis_store import RedisStore, StateBehind, connect
from streams.deadletter import DeadLetterPublisher
from streams.processor import Decoded, Processor, RawRecord

log = structlog.get_logger(__name__)

_UNAVAILABLE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.025)
QUEUE_DEPTH = 2  # decoded batches waiting for the applier
GC_YOUNG_THRESHOLD = 50_000
CATALOG_CHECK_S = 0.2  # how often a starting worker asks whether the catalog is in
CATALOG_TIMEOUT_S = 10.0
CATALOG_LOG_S = 5.0


class BatchWorker:
    """One feature worker: consumes the four feature topics in the streams consumer group."""

    def __init__(self, settings: Settings) -> None:
        s, t = settings.streams, settings.topics
        self.catalog_topic = t.catalog
        self.topics = [t.catalog, t.queries, t.results, t.interactions]
        self.processor = Processor(settings, RedisStore(connect(settings.redis), settings.features, s),
                                   DeadLetterPublisher(settings))
        self.processor.floors = {}  # a commit finding Redis behind what it wrote: replay (below)
        overrides: dict[str, Any] = {
            "session.timeout.ms": int(s.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(s.session_timeout_s * 1000 / 5),
            "partition.assignment.strategy": "cooperative-sticky",
            "fetch.wait.max.ms": 100,
        }
        if s.instance_id:
            overrides["group.instance.id"] = s.instance_id
        # The same consumer again after a fatal error (_restart_consumer).
        self._new_consumer: Callable[[], Consumer] = partial(kafka.consumer, settings, s.group_id,
                                                             **overrides)
        self.consumer: Consumer = self._new_consumer()
        self._consumer_failed: KafkaError | None = None  # a fatal error: the consumer is unusable
        self.batch_size, self.within_s = s.batch_size, s.batch_within_s
        self.commit_interval_s = s.commit_interval_s
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._queue: queue.Queue[Decoded | None] = queue.Queue(QUEUE_DEPTH)
        self._held: Decoded | None = None  # taken from the queue, applied with the next batch
        self._finished: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._lock = threading.Lock()
        self._assigned: set[tuple[str, int]] = set()
        self._paused: set[tuple[str, int]] = set()
        self._catalog_ends: dict[int, int] | None = None  # None once the catalog is in
        self._catalog_checked = self._catalog_logged = 0.0
        self._started = time.monotonic()
        # Set by the applier when Redis lost acknowledged writes (a failover to a replica that
        # lacked them): queued batches are dropped, and the consumer thread seeks every partition
        # back to the offset Redis holds, so exactly what the promoted replica lacks is replayed.
        self._rewind = threading.Event()
        self.replays = 0

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until :meth:`stop` (or SIGTERM/SIGINT when run from the main thread); 0 on a
        clean stop, 70 when a batch could not be applied (it is redelivered after a restart)."""
        # Every event allocates a few dozen short-lived containers: with the default threshold
        # (700) the young generation is collected thousands of times a second; measured 15% of
        # the worker's CPU. Raise it, and move what was allocated at start out of the collector.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
        gc.freeze()
        applier = threading.Thread(target=self._apply_loop, name="features-applier", daemon=True)
        applier.start()
        self._catalog_ends = self._catalog_backlog()
        self._subscribe()
        log.info("streams_worker_started", engine="batch", topics=self.topics,
                 batch_size=self.batch_size, batch_within_s=self.within_s)
        last_commit = time.monotonic()
        try:
            while not self.stopping.is_set():
                if self._rewind.is_set():
                    self._replay_from_redis()
                if self._consumer_failed is not None:
                    self._restart_consumer()
                msgs = self.consumer.consume(self.batch_size, timeout=self.within_s)
                if msgs:
                    self._enqueue(msgs)
                if self._catalog_ends is not None:
                    self._check_catalog()
                if time.monotonic() - last_commit >= self.commit_interval_s:
                    self._commit(asynchronous=True)
                    last_commit = time.monotonic()
        finally:
            self._drain()
            self._queue.put(None)
            applier.join()
            if self.failure is None:
                self._commit(asynchronous=False)
            self.consumer.close()
        if self.failure is not None:
            log.critical("streams_worker_failed", error=repr(self.failure))
            return 70
        log.info("streams_worker_stopped")
        return 0

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("streams_worker_stopping", signal=signal.Signals(signum).name)
        self.stop()

    # --- the two threads --------------------------------------------------------------------

    def _enqueue(self, msgs: list[Message]) -> None:
        raws = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if kafka.is_fatal(err):
                    self._consumer_failed = err
                    break  # the rest is read again by the next consumer
                log.warning("consume_error", error=str(err))
                continue
            raws.append(RawRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value()))
        if raws:
            self._put(self.processor.decode(raws))

    def _subscribe(self) -> None:
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    def _restart_consumer(self) -> None:
        """Replace a consumer a fatal error left unusable. Seen: a static member (instance_id)
        whose session timed out while its group coordinator's broker was down is fenced by its
        own earlier registration when it rejoins (librdkafka issue 3437). What was queued is
        applied first; the new consumer resumes from the group's offsets (or Redis's, when
        lower), and what Redis already holds is skipped as before."""
        log.warning("consumer_restarting", error=str(self._consumer_failed))
        self._drain()
        try:
            self.consumer.close()
        except KafkaException as exc:  # a fatal consumer may refuse even that: it is dropped
            log.warning("consumer_close_failed", error=str(exc))
        with self._lock:
            self._assigned.clear()
            self._paused.clear()
            self._finished.clear()  # committed by the next owner of each partition, after its reads
        self.consumer = self._new_consumer()
        self._consumer_failed = None
        self._subscribe()

    def _put(self, batch: Decoded | None) -> None:
        """Queue for the applier; gives up (the batch is redelivered) if the applier failed."""
        while not self.stopping.is_set() or batch is None:
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _apply_loop(self) -> None:
        last = False
        while not last:
            batch, taken, last = self._take()
            try:
                # After a failure nothing more is applied (nor committed): it is redelivered.
                if batch is not None and self.failure is None:
                    self._apply(batch)
            finally:
                for _ in range(taken):
                    self._queue.task_done()

    def _apply(self, batch: Decoded) -> None:
        if self._rewind.is_set():
            return  # dropped: read again once the consumer thread has sought back
        try:
            self.processor.commit(batch)
        except StateBehind as exc:
            log.warning("redis_behind_replaying",
                        partitions=[f"{t}[{p}]@{o}" for (t, p), o in exc.offsets.items()])
            self._rewind.set()
            return
        except BaseException as exc:  # reported by run(); the worker stops
            log.critical("batch_failed", error=repr(exc), events=len(batch.origins), exc_info=True)
            self.failure = exc
            self.stopping.set()
            return
        self._finish(batch)

    def _take(self) -> tuple[Decoded | None, int, bool]:
        """The next batch, merged with those queued behind it up to ``batch_size`` events: when
        the applier falls behind, its batches grow, and the per-batch costs (two round trips,
        the script's fixed work) are shared by more events. Returns (batch, queue items it
        accounts for, whether the stop sentinel was among them). A batch that would not fit is
        held for the next call (it stays unacknowledged in the queue's count until then)."""
        first, self._held = (self._held, None) if self._held is not None else (self._queue.get(), None)
        if first is None:
            return None, 1, True
        parts, size, taken = [first], _size(first), 1
        while size < self.batch_size:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return _merged(parts), taken + 1, True
            if size + _size(more) > self.batch_size:
                self._held = more
                break
            parts.append(more)
            size += _size(more)
            taken += 1
        return _merged(parts), taken, False

    def _finish(self, batch: Decoded) -> None:
        ends: dict[tuple[str, int], int] = {}
        for rec in (*batch.origins, *batch.letters):
            tp = (rec.topic, rec.partition)
            if rec.offset >= ends.get(tp, 0):
                ends[tp] = rec.offset + 1
        with self._lock:
            for tp, end in ends.items():
                if end > self._finished.get(tp, -1):
                    self._finished[tp] = end

    # --- offsets and rebalances (called on the consumer thread) -----------------------------

    def _drain(self) -> None:
        """Wait until every queued batch is applied (or the applier has failed)."""
        self._queue.join()

    def _commit(self, asynchronous: bool, only: set[tuple[str, int]] | None = None) -> None:
        with self._lock:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._finished.items()
                       if (t, p) in self._assigned and (only is None or (t, p) in only)]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            # Redis holds the truth (partition offsets); a lost commit only means redeliveries
            # that the commit script recognises and skips.
            log.warning("offset_commit_failed", error=str(exc), partitions=len(offsets))

    def _replay_from_redis(self) -> None:
        """Seek every assigned partition to the offset after the one Redis holds (its beginning
        when Redis holds none: nothing of it is there), once the applier dropped what was queued."""
        self._drain()
        assigned = sorted(self._assigned)
        stored = self._stored_offsets(assigned)
        for (t, p) in assigned:
            o = stored.get((t, p))
            self.consumer.seek(TopicPartition(t, p, OFFSET_BEGINNING if o is None else o + 1))
        with self._lock:
            self._finished.clear()
        self.processor.floors = dict(stored)
        self.replays += 1
        self._rewind.clear()
        log.warning("replaying_from_redis", partitions=len(assigned),
                    offsets={f"{t}[{p}]": o for (t, p), o in stored.items()})

    def _stored_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The last offset of each partition whose effect is in Redis (absent: none)."""
        if not partitions:
            return {}
        # Redis unreachable (a failover under way): wait for it, as the applier does for a batch.
        return Retry(_UNAVAILABLE_BACKOFF, -1).call_with_retry(
            lambda: self.processor.store.offsets(partitions), lambda _exc: None)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((p.topic, p.partition) for p in partitions)
        # Redis holds the truth: resume from the group's committed offset, or after the last
        # offset Redis holds when that is lower: a failover dropped writes that the Kafka commit
        # had followed (what Redis holds above the commit is redelivered and skipped, as before;
        # no committed offset to compare, as the lookup here sometimes answers: the default).
        stored = self._stored_offsets([(p.topic, p.partition) for p in partitions])
        if stored:
            committed = {(c.topic, c.partition): c.offset
                         for c in consumer.committed(partitions, timeout=CATALOG_TIMEOUT_S)}
            for p in partitions:
                tp = (p.topic, p.partition)
                if tp in stored and committed.get(tp, -1) > stored[tp] + 1:
                    p.offset = stored[tp] + 1
        consumer.incremental_assign(partitions)
        if self._catalog_ends is not None:  # still loading the catalog: shopper events wait
            waiting = [p for p in partitions if p.topic != self.catalog_topic]
            if waiting:
                consumer.pause(waiting)
                self._paused.update((p.topic, p.partition) for p in waiting)
        log.info("partitions_assigned", partitions=_names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._drain()
        self._commit(asynchronous=False, only=revoked)
        self._release(revoked)
        log.info("partitions_revoked", partitions=_names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release({(p.topic, p.partition) for p in partitions})
        log.warning("partitions_lost", partitions=_names(partitions))

    def _release(self, partitions: set[tuple[str, int]]) -> None:
        self._assigned -= partitions
        self._paused -= partitions
        with self._lock:
            for tp in partitions:
                self._finished.pop(tp, None)
                if self.processor.floors is not None:
                    self.processor.floors.pop(tp, None)

    # --- the catalog first ---------------------------------------------------------------------

    def _catalog_backlog(self) -> dict[int, int] | None:
        """End offset of each non-empty catalog partition now; None when there is none."""
        marks = kafka.watermarks(self.consumer, [self.catalog_topic], CATALOG_TIMEOUT_S)
        return {p: high for (_, p), (_, high) in marks.items()} or None

    def _check_catalog(self) -> None:
        """Resume shopper events once the group's committed catalog offsets reach the ends."""
        now = time.monotonic()
        if now - self._catalog_checked < CATALOG_CHECK_S or self._catalog_ends is None:
            return
        self._catalog_checked = now
        ends = self._catalog_ends
        committed = self.consumer.committed([TopicPartition(self.catalog_topic, p) for p in ends],
                                            timeout=CATALOG_TIMEOUT_S)
        behind = {tp.partition: ends[tp.partition] - tp.offset for tp in committed
                  if tp.offset < ends[tp.partition]}  # no commit yet reads as -1001
        if behind:
            if now - self._catalog_logged >= CATALOG_LOG_S:
                self._catalog_logged = now
                log.info("catalog_loading", records_behind=sum(behind.values()),
                         partitions_behind=len(behind))
            return
        self._catalog_ends = None
        if self._paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in self._paused])
            self._paused.clear()
        log.info("catalog_loaded", partitions=len(ends), seconds=round(now - self._started, 2))


def _size(batch: Decoded) -> int:
    return len(batch.origins) + len(batch.letters)


def _merged(parts: list[Decoded]) -> Decoded:
    if len(parts) == 1:
        return parts[0]
    return Decoded([r for p in parts for r in p.records], [o for p in parts for o in p.origins],
                   [letter for p in parts for letter in p.letters])


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{p.topic}[{p.partition}]" for p in partitions]


def run_batch_worker(settings: Settings) -> int:
    worker = BatchWorker(settings)
    worker.install_signal_handlers()
    return worker.run()
