"""The joiner: ranked results and the interactions that followed them -> labeled lists, exactly
once in effect.

``shoprank joiner`` consumes the results and interactions topics in its own consumer group with
range assignment: both topics are keyed by user id over the same number of partitions, so
partition p of each goes to one joiner, which owns task p (its shoppers). For each batch of a
partition it

1. reads from Redis the partition's applied offsets and clock, and the lists the batch touches
   (by query id, by shopper) or whose window the new watermark closes;
2. joins them (:mod:`streams.join`, pure rules in event time);
3. commits one Redis transaction: the lists, the indexes, the offsets, the clock, the counts, and
   the lists to emit appended to the partition's outbox stream;
4. publishes the outbox to partition p of the labeled topic (idempotent producer, acknowledged)
   and deletes what was published.

A record at or below the stored offset of its partition is a redelivery and is skipped, so a
crash anywhere before 3 loses nothing and after it counts nothing twice. A crash between the
broker's acknowledgement and the deletion in 4 would publish entries twice: so every message
carries its outbox id (header ``outbox_id``) and a joiner taking partition p first reads the last
message of labeled partition p and drops the outbox entries up to that id. One joiner owns a
partition at a time (the consumer group); the offsets key is watched, so a joiner that lost its
partition without noticing cannot commit over the new owner.

Redis holds the truth, and may lose some of it: a Sentinel failover promotes a replica that lacked
the last writes the primary acknowledged (replication is asynchronous). A joiner remembers the
highest offset it committed per input partition; a batch that reads a lower one from Redis writes
nothing, and the joiner seeks both inputs of that partition back to the offsets after Redis's and
checks the outbox against the labeled topic again: what the replica lacks is joined again. Lists it
had already published are published again with the same id and revision, which readers of the
labeled topic keep once (trainer.labeled keeps the newest revision of each list). A joiner taking
a partition starts from Redis's offsets (the group's commit may be past them after a failover).
A Redis error (a failover under way, a restart) is retried with backoff, never fatal.

The watermark of partition p is the latest event time read on each input, the lesser of the two
while both are being read; an input idle for ``idle_s`` of wall time (read to its end, or
quiet) holds nothing back, so a quiet shop's lists still close.
A timestamp from the future (beyond the wall clock plus ``MAX_FUTURE_S``) is joined but does not
move the watermark: one bad clock must not close every open list.
"""

from __future__ import annotations

import math
import signal
import time
from collections import defaultdict
from collections.abc import Sequence
from types import FrameType
from typing import Any

import msgspec
import redis
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from core import events, kafka
from core.events import InvalidEvent, RankedResult
from core.settings import Settings
from core.topics import event_key
from features import keys
from features.redis_store import StateBehind, connect
from streams import metrics
from streams.join import JoinCounts, JoinTask, OpenList, coverage

log = structlog.get_logger(__name__)

MAX_FUTURE_S = 3600.0
PROGRESS_EVERY_S = 10.0
IDLE_TICK_S = 0.5  # how often partitions without new records are checked for lists to close
OUTBOX_HEADER = "outbox_id"
WATERMARK = "w"
RESULTS_READ = "r"  # the clock's field: broker time (ms) of the newest result read
# What a failover or restart raises while Redis is briefly unreachable or read-only: retried.
REDIS_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
                   redis.exceptions.BusyLoadingError)
REDIS_BACKOFF = ExponentialWithJitterBackoff(cap=5.0, base=0.2)

_list_encoder = msgspec.msgpack.Encoder()
_list_decoder = msgspec.msgpack.Decoder(OpenList)


def _outbox_id(raw: bytes | str) -> tuple[int, int]:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


class Joiner:
    """One joiner process (several share the partitions through the consumer group)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.cfg = settings.joiner
        t = settings.topics
        self.results_topic, self.interactions_topic, self.labeled_topic = t.results, t.interactions, t.labeled
        self.redis = client or connect(settings.redis)
        self.consumer: Consumer = kafka.consumer(settings, group_id=self.cfg.group_id, **{
            "partition.assignment.strategy": "range",  # partition p of both topics to one joiner
            "session.timeout.ms": int(self.cfg.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(self.cfg.session_timeout_s * 1000 / 5),
            "fetch.wait.max.ms": 100,
        })
        self.producer = kafka.producer(settings, **{"linger.ms": 5, "compression.type": "zstd"})
        self.stopping = False
        self.totals = JoinCounts()
        self._finished: dict[tuple[str, int], int] = {}
        self._recovered: set[int] = set()  # partitions whose outbox was checked against the topic
        self._assigned: set[tuple[str, int]] = set()
        self._assigned_at = time.monotonic()
        self._last_read: dict[tuple[str, int], float] = {}  # wall clock of each input's last record
        # The highest offset of each input partition this process committed to Redis: reading a
        # lower one means Redis lost acknowledged writes (a promoted replica).
        self._written: dict[tuple[str, int], int] = {}
        self._last_progress = self._last_tick = time.monotonic()

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        self._check_partitions()
        self.consumer.subscribe([self.results_topic, self.interactions_topic],
                                on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("joiner_started", group=self.cfg.group_id, click_window_s=self.cfg.click_window_s,
                 purchase_window_s=self.cfg.purchase_window_s)
        try:
            while not self.stopping:
                msgs = self.consumer.consume(self.cfg.batch_size, timeout=self.cfg.batch_within_s)
                self.handle(msgs)
        finally:
            self._commit(asynchronous=False)
            self.consumer.close()
            self.producer.flush(30)
        counts = self.totals.as_dict()
        log.info("joiner_stopped", **counts, click_coverage=round(coverage(counts), 4))
        return 0

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("joiner_stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _check_partitions(self) -> None:
        meta = self.consumer.list_topics(timeout=10).topics
        counts = {name: len(meta[name].partitions) for name in
                  (self.results_topic, self.interactions_topic, self.labeled_topic) if name in meta}
        if len(set(counts.values())) != 1 or len(counts) != 3:
            raise RuntimeError(f"the joiner needs results, interactions and labeled topics with one "
                               f"partition count (they are co-partitioned by user id): {counts}")

    # --- one poll's records -----------------------------------------------------------------

    def handle(self, msgs: Sequence[Message]) -> None:
        by_partition: dict[int, list[Message]] = defaultdict(list)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                continue
            by_partition[m.partition()].append(m)
        # A partition with nothing new may still close lists (its inputs reached their ends).
        if time.monotonic() - self._last_tick >= IDLE_TICK_S:
            self._last_tick = time.monotonic()
            for topic, p in self._assigned:
                if topic == self.results_topic:
                    by_partition.setdefault(p, [])
        for p, part in sorted(by_partition.items()):
            self._partition(p, part)
        self._commit(asynchronous=True)
        if time.monotonic() - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = time.monotonic()
            try:
                self.progress()
            except REDIS_TRANSIENT as exc:  # a progress line is not worth waiting for Redis
                log.warning("redis_unavailable", during="progress", error=str(exc))

    def progress(self) -> dict[str, Any]:
        """Counts summed over every partition's stored totals (all joiners), logged and returned."""
        totals = self.stored_totals()
        cov = coverage(totals)
        metrics.JOIN_COVERAGE.set(cov)
        log.info("joiner_progress", click_coverage=round(cov, 4), **totals)
        return {**totals, "click_coverage": cov}

    def stored_totals(self) -> dict[str, int]:
        topic = self.consumer.list_topics(self.results_topic, timeout=10).topics[self.results_topic]
        return stored_totals(self.redis, len(topic.partitions))

    def _partition(self, p: int, msgs: list[Message]) -> None:
        read_at = time.monotonic()
        for m in msgs:
            self._last_read[(m.topic(), p)] = read_at
        if p not in self._recovered:
            self._retrying("recover_outbox", self._recover_outbox, p)
        while True:
            try:
                emitted = self._retrying("apply", self._apply, p, msgs)
                break
            except redis.WatchError:  # another writer touched this partition's offsets: re-read
                metrics.CONFLICTS.inc()
            except StateBehind as exc:
                self._replay(p, exc.offsets)
                return  # the rest of this batch is read again after the seek
        if emitted:
            self._retrying("publish_outbox", self._publish_outbox, p)
        for m in msgs:
            tp = (m.topic(), m.partition())
            self._finished[tp] = max(self._finished.get(tp, 0), m.offset() + 1)

    def _retrying(self, during: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, again after each transient Redis error (the client's own retries spent:
        a failover can outlast them), backing off as the feature workers do. A step retried after
        its effect landed is harmless: offsets skip what was applied, outbox ids what was published."""
        def failed(exc: Exception, failures: int) -> None:
            metrics.JOIN_REDIS_UNAVAILABLE.inc()
            log.warning("redis_unavailable", during=during, error=str(exc), failures=failures,
                        retry_in_s=round(REDIS_BACKOFF.compute(failures), 2))
            if self.stopping:
                raise exc

        forever = Retry(REDIS_BACKOFF, -1, supported_errors=REDIS_TRANSIENT)
        return forever.call_with_retry(lambda: fn(*args), failed, with_failure_count=True)

    def _replay(self, p: int, stored: dict[tuple[str, int], int]) -> None:
        """Redis lost some of partition p's writes: seek both inputs to after what it holds (their
        beginning when it holds nothing) and check the outbox against the topic again."""
        metrics.JOIN_REPLAYS.inc()
        for topic in (self.results_topic, self.interactions_topic):
            o = stored.get((topic, p), -1)
            self.consumer.seek(TopicPartition(topic, p, OFFSET_BEGINNING if o < 0 else o + 1))
            self._written[(topic, p)] = o
            if o >= 0:
                self._finished[(topic, p)] = o + 1
            else:
                self._finished.pop((topic, p), None)
        self._recovered.discard(p)
        log.warning("replaying_from_redis", partition=p,
                    offsets={f"{t}[{q}]": o for (t, q), o in sorted(stored.items())})

    def _apply(self, p: int, msgs: list[Message]) -> int:
        """Read, join and commit one partition's batch; returns how many lists it emitted."""
        offsets_key, clock_key = keys.join_offsets(p), keys.join_clock(p)
        with self.redis.pipeline(transaction=True) as tx:
            tx.watch(offsets_key)
            reads = self.redis.pipeline(transaction=False)
            reads.hgetall(offsets_key)
            reads.hgetall(clock_key)
            applied_raw, clock_raw = reads.execute()
            applied = {k.decode(): int(v) for k, v in applied_raw.items()}
            inputs = (self.results_topic, self.interactions_topic)
            if any(applied.get(t, -1) < self._written.get((t, p), -1) for t in inputs):
                raise StateBehind({(t, p): applied.get(t, -1) for t in inputs})
            clock = {k.decode(): float(v) for k, v in clock_raw.items()}
            fresh = [m for m in msgs if m.offset() > applied.get(m.topic(), -1)]
            pairs = self._decode(fresh)
            decoded = [ev for ev, _ in pairs]
            for m in fresh:
                if m.topic() == self.results_topic:
                    clock[RESULTS_READ] = max(clock.get(RESULTS_READ, 0.0), float(m.timestamp()[1]))
            ceiling = time.time() + MAX_FUTURE_S
            for ev in decoded:
                t = ev.timestamp.timestamp()
                if t <= ceiling and not (isinstance(ev, RankedResult) and ev.error is not None):
                    topic = self.results_topic if isinstance(ev, RankedResult) else self.interactions_topic
                    clock[topic] = max(clock.get(topic, -math.inf), t)
            stored_watermark = clock.get(WATERMARK, -math.inf)
            watermark = max(stored_watermark, self._watermark(p, clock))
            if not fresh and watermark == stored_watermark:
                return 0  # an idle partition whose watermark did not move: nothing to do
            # The lists the batch names, the shoppers' held lists, and those now due.
            unattributed = {(ev.user_id, ev.timestamp.timestamp()) for ev in decoded
                            if not isinstance(ev, RankedResult) and ev.query_id is None}
            reads.zrangebyscore(keys.join_due(p), "-inf", watermark)
            for user, t in unattributed:
                reads.zrangebyscore(keys.join_user(p, user), t - self.cfg.purchase_window_s, t,
                                    withscores=True)
            due_raw, *user_raw = reads.execute()
            due = [q.decode() for q in due_raw]
            user_lists: dict[str, dict[str, float]] = defaultdict(dict)
            for (user, _), rows in zip(unattributed, user_raw, strict=True):
                user_lists[user].update({q.decode(): s for q, s in rows})
            wanted = set(due) | {q for m in user_lists.values() for q in m}
            wanted |= {ev.query_id for ev in decoded if ev.query_id is not None}
            ordered = sorted(wanted)
            lists = {}
            if ordered:
                held = self.redis.mget([keys.join_list(p, q) for q in ordered])
                lists = {q: _list_decoder.decode(raw) for q, raw in zip(ordered, held, strict=True)
                         if raw is not None}
            task = JoinTask(self.cfg, lists, user_lists)
            for ev, m in pairs:
                if isinstance(ev, RankedResult):
                    task.result(ev, m.value())
                else:
                    task.interaction(ev, m.timestamp()[1])
            task.advance(watermark, due, self._results_read_ms(clock))
            last = self._write(tx, p, task, fresh, clock, watermark)
            tx.execute()
        for t, o in last.items():
            self._written[(t, p)] = o
        self.totals.add(task.counts)
        metrics.count_join(task.counts)
        return len(task.emitted)

    def _decode(self, msgs: list[Message]) -> list[tuple[Any, Message]]:
        """Valid events of the batch and their records (invalid events are the feature workers'
        to dead-letter: here they are counted and skipped)."""
        out = []
        for m in msgs:
            codec = events.RESULTS if m.topic() == self.results_topic else events.INTERACTIONS
            try:
                out.append((codec.decode(m.value() or b""), m))
            except InvalidEvent:
                metrics.JOIN_SKIPPED.labels(m.topic()).inc()
        return out

    @staticmethod
    def _results_read_ms(clock: dict[str, float]) -> float:
        """Broker time of the newest result read on the partition. No idle shortcut here: after a
        broker outage the results input is quiet while it still has results to deliver."""
        return clock.get(RESULTS_READ, 0.0)

    def _watermark(self, p: int, clock: dict[str, float]) -> float:
        """The lesser latest event time of the two inputs; an input idle for ``idle_s`` (nothing
        read from it in that long: read to its end, or quiet) holds nothing back."""
        now = time.monotonic()
        inputs = (self.results_topic, self.interactions_topic)  # (RESULTS_READ is no input)
        active = [clock.get(t, -math.inf) for t in inputs
                  if now - self._last_read.get((t, p), self._assigned_at) < self.cfg.idle_s]
        if active:
            return min(active)
        return max(clock.get(t, -math.inf) for t in inputs)

    def _write(self, tx: redis.client.Pipeline, p: int, task: JoinTask, fresh: list[Message],
               clock: dict[str, float], watermark: float) -> dict[str, int]:
        """Queue the batch's writes on ``tx``; returns the last offset per input it records."""
        tx.multi()
        for qid in task.changed:
            lst = task.lists[qid]
            tx.set(keys.join_list(p, qid), _list_encoder.encode(lst))
            tx.zadd(keys.join_due(p), {qid: lst.deadline(self.cfg)})
        if task.deleted:
            tx.delete(*(keys.join_list(p, q) for q in task.deleted))
            tx.zrem(keys.join_due(p), *task.deleted)
        for user, served in task.indexed.items():
            tx.zadd(keys.join_user(p, user), served)
        for user, qids in task.unindexed.items():
            tx.zrem(keys.join_user(p, user), *qids)
        for ev in task.emitted:
            tx.xadd(keys.join_outbox(p), {"k": event_key(ev), "v": events.encode(ev)})
        last: dict[str, int] = {}
        for m in fresh:
            last[m.topic()] = max(last.get(m.topic(), -1), m.offset())
        if last:
            tx.hset(keys.join_offsets(p), mapping=last)  # type: ignore[arg-type]
        stamps = {k: v for k, v in clock.items() if math.isfinite(v) and k != WATERMARK}  # incl. RESULTS_READ
        if math.isfinite(watermark):
            stamps[WATERMARK] = watermark
        if stamps:
            tx.hset(keys.join_clock(p), mapping=stamps)  # type: ignore[arg-type]
        for name, n in task.counts.as_dict().items():
            if n:
                tx.hincrby(keys.join_stats(p), name, n)
        return last

    # --- the outbox -------------------------------------------------------------------------

    def _publish_outbox(self, p: int) -> None:
        """Publish partition p's outbox in order, wait for the broker, delete what it acknowledged."""
        box = keys.join_outbox(p)
        while True:
            entries = self.redis.xrange(box, count=self.cfg.batch_size)
            if not entries:
                return
            kafka.send_acked(self.producer, self.labeled_topic, [
                (fields[b"k"], fields[b"v"], [(OUTBOX_HEADER, entry_id)]) for entry_id, fields in entries
            ], partition=p)
            self.redis.xdel(box, *(entry_id for entry_id, _ in entries))
            metrics.JOIN_PUBLISHED.inc(len(entries))

    def _recover_outbox(self, p: int) -> None:
        """Drop outbox entries that already reached the topic (a crash after the acknowledgement,
        before their deletion), then publish the rest."""
        last = last_outbox_id(self.settings, self.labeled_topic, p)
        box = keys.join_outbox(p)
        if last is not None:
            done = [eid for eid, _ in self.redis.xrange(box, max=f"{last[0]}-{last[1]}")]
            if done:
                self.redis.xdel(box, *done)
                log.info("outbox_recovered", partition=p, already_published=len(done))
        self._recovered.add(p)
        self._publish_outbox(p)

    # --- offsets and rebalances -------------------------------------------------------------

    def _commit(self, asynchronous: bool, only: set[tuple[str, int]] | None = None) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._finished.items()
                   if (t, p) in self._assigned and (only is None or (t, p) in only)]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
            except KafkaException as exc:  # Redis holds the truth; redeliveries are skipped
                log.warning("offset_commit_failed", error=str(exc))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Start after what Redis holds where it holds something: past the group's commit that is a
        # redelivery, skipped; below it, what a failover lost, joined again.
        stored = self._retrying("assign", self._stored_offsets, {tp.partition for tp in partitions})
        for tp in partitions:
            o = stored.get((tp.topic, tp.partition))
            if o is not None:
                tp.offset = o + 1
                self._written[(tp.topic, tp.partition)] = o
        consumer.assign(partitions)
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._assigned_at = time.monotonic()
        log.info("partitions_assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _stored_offsets(self, partitions: set[int]) -> dict[tuple[str, int], int]:
        """(input topic, partition) -> the last offset Redis holds as joined."""
        ordered = sorted(partitions)
        with self.redis.pipeline(transaction=False) as pipe:
            for p in ordered:
                pipe.hgetall(keys.join_offsets(p))
            rows = pipe.execute()
        return {(k.decode(), p): int(v) for p, row in zip(ordered, rows, strict=True) for k, v in row.items()}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._commit(asynchronous=False, only=revoked)
        self._assigned -= revoked
        for t, p in revoked:
            self._finished.pop((t, p), None)
            self._written.pop((t, p), None)
            self._recovered.discard(p)
        log.info("partitions_revoked", partitions=[f"{t}[{p}]" for t, p in sorted(revoked)])


def last_outbox_id(settings: Settings, topic: str, partition: int, timeout_s: float = 10.0
                   ) -> tuple[int, int] | None:
    """The outbox id of the last message of ``topic``[``partition``], None when it has none."""
    reader = kafka.consumer(settings, group_id=f"{settings.joiner.group_id}-recovery")
    try:
        tp = TopicPartition(topic, partition)
        low, high = reader.get_watermark_offsets(tp, timeout=timeout_s)
        if high <= low:
            return None
        reader.assign([TopicPartition(topic, partition, high - 1)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            for name, value in msg.headers() or []:
                if name == OUTBOX_HEADER and value is not None:
                    return _outbox_id(value)
            return None
        raise TimeoutError(f"could not read the last message of {topic}[{partition}]")
    finally:
        reader.close()


def stored_totals(client: redis.Redis, partitions: int) -> dict[str, int]:
    """The joiner's counts over every partition (what every joiner process has committed)."""
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.hgetall(keys.join_stats(p))
    totals: dict[str, int] = dict.fromkeys(JoinCounts().as_dict(), 0)
    for stats in pipe.execute():
        for k, v in stats.items():
            totals[k.decode()] = totals.get(k.decode(), 0) + int(v)
    return totals


def run_joiner(settings: Settings) -> int:
    from core.metrics import serve_metrics

    serve_metrics(settings, settings.joiner.metrics_port, "joiner")
    joiner = Joiner(settings)
    joiner.install_signal_handlers()
    return joiner.run()
