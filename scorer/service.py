"""The scorer's Kafka loop: consume query micro-batches, rank them, produce results, commit.

Backpressure is Kafka itself: the loop takes at most ``max_batch`` queries, waits at most
``max_wait_ms`` for a batch to fill, ranks it and hands its results to the producer. It does not
wait for the broker's acknowledgement before ranking the next batch (that round trip was a third
of the loop's time), but at most ``MAX_IN_FLIGHT`` batches may await it: past that the loop pulls
nothing more. A batch's offsets are committed only once its results, and those of every batch
before it, are acknowledged. A crash therefore loses no query (it is consumed again), and what
the process holds is bounded: one batch being ranked and ``MAX_IN_FLIGHT`` awaiting the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from core import kafka
from core.events import RankedResult, encode
from core.logs import hash_user
from core.processes import name_os_thread
from core.settings import Settings
from core.topics import route
from scorer.metrics import ScorerMetrics
from scorer.ranking import Incoming, QueryRanker, decode_all, mark
from scorer.swap import ModelHolder

log = structlog.get_logger(__name__)

LAG_EVERY_S = 2.0
# One log line per this many seconds sums the batches ranked (a line per batch was ~5% of the
# scoring thread at 100 queries/s); each batch and query is logged at debug level.
SUMMARY_EVERY_S = 10.0
# Acknowledged batches' offsets are committed together at most this often (one commit request
# per batch was ~2% of the scoring thread and as many requests to the broker); a crash redoes at
# most this long of queries (their results are published again, with the same query ids).
COMMIT_EVERY_S = 0.1
MAX_IN_FLIGHT = 4  # batches whose results await the broker's acknowledgement
FETCH_WAIT_MS = 100
# How long an idle loop sleeps in the consumer's poll before it commits what the broker
# acknowledged and updates the lag gauge.
IDLE_WAKE_S = 0.05


@dataclass
class _InFlight:
    """One batch's results on their way to the broker, and the offsets to commit once they land."""

    offsets: list[TopicPartition]
    remaining: int
    failure: str | None = None

    def delivered(self, err, _msg) -> None:  # type: ignore[no-untyped-def]  # librdkafka's callback
        if err is not None:
            self.failure = str(err)
        self.remaining -= 1


class ScoringLoop(threading.Thread):
    def __init__(self, settings: Settings, holder: ModelHolder, ranker: QueryRanker,
                 metrics: ScorerMetrics) -> None:
        super().__init__(name="scoring-loop", daemon=True)
        self.settings = settings
        self.holder = holder
        self.ranker = ranker
        self.metrics = metrics
        self.assigned = threading.Event()
        self._stopping = threading.Event()
        self._summary = _Summary()
        self._acknowledged: dict[tuple[str, int], int] = {}  # offsets to commit next
        self._consumer: Consumer | None = None

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        name_os_thread(self.name)  # top -H and bench.scorer tell it from the other Python threads
        s = self.settings
        # The broker answers a fetch as soon as a query arrives (fetch.min.bytes 1), so a long
        # wait costs no latency; a 5 ms one had the client fetch 200 times a second while idle.
        overrides: dict[str, object] = {
            "fetch.wait.max.ms": FETCH_WAIT_MS, "auto.offset.reset": "latest",
            "session.timeout.ms": int(s.scorer.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(s.scorer.session_timeout_s * 1000 / 5),
        }
        consumer = kafka.consumer(s, group_id=s.scorer.group_id, **overrides)
        # Compressed (SHOPRANK_SCORER_RESULTS_COMPRESSION: a 100-candidate result is 22 KB of JSON,
        # mostly its served features); no linger, so a result is never held back for a batch to fill.
        producer = kafka.producer(s, **{"linger.ms": 0, "compression.type": s.scorer.results_compression})
        consumer.subscribe([s.topics.queries], on_assign=lambda c, parts: self.assigned.set())
        self._consumer = consumer
        last_lag = last_commit = 0.0
        pending: deque[_InFlight] = deque()
        # The loop's own Kafka work (polling for queries, delivery reports, commits) is the
        # "consume" stage in CPU time; _handle times the batch's stages itself.
        consume_cpu = self.metrics.stage_cpu.labels(stage="consume")
        try:
            while not self._stopping.is_set():
                turn = time.thread_time()
                msgs = self._next_batch(consumer)
                if msgs:
                    consume_cpu.inc(time.thread_time() - turn)
                    pending.append(self._handle(msgs, producer))
                    turn = time.thread_time()
                producer.poll(0)  # delivery reports
                self._settle(pending)
                while len(pending) >= MAX_IN_FLIGHT and not self._stopping.is_set():  # backpressure
                    producer.poll(0.05)
                    self._settle(pending)
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    self._commit(consumer)
                    last_commit = time.monotonic()
                if time.monotonic() - last_lag > LAG_EVERY_S:
                    self._update_lag(consumer)
                    last_lag = time.monotonic()
                consume_cpu.inc(time.thread_time() - turn)
        finally:
            try:
                producer.flush(10)
                self._settle(pending)
                self._commit(consumer, final=True)
            finally:
                consumer.close()

    def _next_batch(self, consumer: Consumer) -> list[Message]:
        """Block until a query arrives (or ``IDLE_WAKE_S`` passes: acknowledgements, lag), then
        take what else arrives within ``max_wait_ms``, up to ``max_batch``. Waiting in 2 ms slices
        instead cost the loop ~5 empty turns per query at 100 queries/s."""
        first = consumer.poll(timeout=IDLE_WAKE_S)
        if first is None:
            return []
        cfg = self.settings.scorer
        rest = consumer.consume(num_messages=cfg.max_batch - 1, timeout=cfg.max_wait_ms / 1000) \
            if cfg.max_batch > 1 else []
        for m in (first, *rest):
            err = m.error()
            if err is not None and kafka.is_fatal(err):
                # The consumer is unusable: end the loop, so /ready says so and a supervisor restarts it.
                raise KafkaException(err)
        return [m for m in (first, *rest) if m.error() is None]

    def _settle(self, pending: deque[_InFlight]) -> None:
        """Take the oldest batches whose results the broker has acknowledged: their offsets are
        the next commit's."""
        done = self._acknowledged
        while pending and pending[0].remaining <= 0:
            batch = pending.popleft()
            if batch.failure is not None:
                raise RuntimeError(f"ranked results were not acknowledged by the broker: {batch.failure}")
            for tp in batch.offsets:
                done[(tp.topic, tp.partition)] = max(done.get((tp.topic, tp.partition), 0), tp.offset)

    def _commit(self, consumer: Consumer, final: bool = False) -> None:
        """Commit what :meth:`_settle` took since the last commit."""
        if self._acknowledged:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self._acknowledged.items()],
                            asynchronous=not final)
            self._acknowledged = {}

    def _handle(self, msgs: list[Message], producer) -> _InFlight:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        self.metrics.queue_depth.set(len(msgs))
        items = [Incoming(m.value() or b"", _published_at(m)) for m in msgs]
        queries, errors = decode_all(items)
        model = self.holder.current  # one version for the whole batch: swaps happen between batches
        results = errors + self.ranker.rank(model, queries)
        nxt: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic(), m.partition())
            nxt[key] = max(nxt.get(key, 0), m.offset() + 1)
        batch = _InFlight([TopicPartition(t, p, o) for (t, p), o in nxt.items()], remaining=len(results))
        publishing = mark()
        for r in results:
            topic, key = route(self.settings, r)
            producer.produce(topic, key=key.encode(), value=encode(r), on_delivery=batch.delivered)
        self.ranker.time_stage("publish", publishing)  # encoding and handing results to the producer
        self._observe(results, model.version, time.perf_counter() - started)
        self.metrics.queue_depth.set(0)
        return batch

    def _observe(self, results: list[RankedResult], version: str, seconds: float) -> None:
        self.metrics.batch_size.observe(len(results))
        errors = sum(1 for r in results if r.error)
        for r in results:
            self.metrics.latency.observe(r.latency_ms / 1000)
        self.metrics.ranked.inc(len(results) - errors)
        self.metrics.errors.inc(errors)
        latency_max = max(r.latency_ms for r in results)
        self._summary.add(len(results), errors, latency_max, version)
        if self._summary.due():
            log.info("batches_ranked", **self._summary.take())
        if not log_debug():
            return
        log.debug("batch_ranked", queries=len(results), errors=errors, model_version=version,
                  batch_ms=round(seconds * 1000, 2), latency_ms_max=round(latency_max, 2))
        for r in results:
            log.debug("query_ranked", query_id=r.query_id, user=hash_user(r.user_id), model_version=version,
                      latency_ms=round(r.latency_ms, 2), products=len(r.products), error=r.error)

    def _update_lag(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
        if not assignment:
            return
        lag = 0
        for tp in consumer.position(assignment):
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
            if tp.offset >= 0 and high >= 0:
                lag += max(0, high - tp.offset)
        self.metrics.consumer_lag.set(lag)


@dataclass
class _Summary:
    """What the loop ranked since its last summary line."""

    batches: int = 0
    queries: int = 0
    errors: int = 0
    latency_ms_max: float = 0.0
    model_version: str = ""
    since: float = field(default_factory=time.monotonic)

    def add(self, queries: int, errors: int, latency_ms_max: float, version: str) -> None:
        self.batches += 1
        self.queries += queries
        self.errors += errors
        self.latency_ms_max = max(self.latency_ms_max, latency_ms_max)
        self.model_version = version

    def due(self) -> bool:
        return time.monotonic() - self.since >= SUMMARY_EVERY_S

    def take(self) -> dict[str, object]:
        out = {"batches": self.batches, "queries": self.queries, "errors": self.errors,
               "latency_ms_max": round(self.latency_ms_max, 2), "model_version": self.model_version,
               "seconds": round(time.monotonic() - self.since, 1)}
        self.batches = self.queries = self.errors = 0
        self.latency_ms_max = 0.0
        self.since = time.monotonic()
        return out


def log_debug() -> bool:
    """Whether debug lines are written (structlog's filtering level), so none is built for nothing."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def _published_at(msg: Message) -> float:
    kind, ms = msg.timestamp()
    return ms / 1000 if kind and ms > 0 else time.time()
