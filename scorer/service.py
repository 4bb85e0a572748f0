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

import threading
import time
from collections import deque
from dataclasses import dataclass

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from core import kafka
from core.events import RankedResult, encode
from core.logs import hash_user
from core.settings import Settings
from core.topics import route
from scorer.metrics import ScorerMetrics
from scorer.ranking import Incoming, QueryRanker, decode_all, mark
from scorer.swap import ModelHolder

log = structlog.get_logger(__name__)

LAG_EVERY_S = 2.0
MAX_IN_FLIGHT = 4  # batches whose results await the broker's acknowledgement
FETCH_WAIT_MS = 100
# How long an idle loop sleeps in the consumer's poll before it commits what the broker
# acknowledged and updates the lag gauge.
IDLE_WAKE_S = 0.05
RESULTS_COMPRESSION = "zstd"  # the results producer's codec (bench/result_size.py measures with it)


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
        self._consumer: Consumer | None = None

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        s = self.settings
        # The broker answers a fetch as soon as a query arrives (fetch.min.bytes 1), so a long
        # wait costs no latency; a 5 ms one had the client fetch 200 times a second while idle.
        overrides: dict[str, object] = {
            "fetch.wait.max.ms": FETCH_WAIT_MS, "auto.offset.reset": "latest",
            "session.timeout.ms": int(s.scorer.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(s.scorer.session_timeout_s * 1000 / 5),
        }
        consumer = kafka.consumer(s, group_id=s.scorer.group_id, **overrides)
        # zstd: a 100-candidate result goes from 22 KB to 5 KB on the wire for 0.06 ms of compression
        # (publish-to-consume p50 +0.1-0.4 ms, bench/result_size.py --broker); no linger, so a
        # result is never held back for a batch to fill.
        producer = kafka.producer(s, **{"linger.ms": 0, "compression.type": RESULTS_COMPRESSION})
        consumer.subscribe([s.topics.queries], on_assign=lambda c, parts: self.assigned.set())
        self._consumer = consumer
        last_lag = 0.0
        pending: deque[_InFlight] = deque()
        try:
            while not self._stopping.is_set():
                msgs = self._next_batch(consumer)
                if msgs:
                    pending.append(self._handle(msgs, producer))
                producer.poll(0)  # delivery reports
                self._commit_acknowledged(consumer, pending)
                while len(pending) >= MAX_IN_FLIGHT and not self._stopping.is_set():  # backpressure
                    producer.poll(0.05)
                    self._commit_acknowledged(consumer, pending)
                if time.monotonic() - last_lag > LAG_EVERY_S:
                    self._update_lag(consumer)
                    last_lag = time.monotonic()
        finally:
            try:
                producer.flush(10)
                self._commit_acknowledged(consumer, pending, final=True)
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
            if err is not None and (err.fatal() or err.code() == KafkaError._FATAL):
                # The consumer is unusable: end the loop, so /ready says so and a supervisor restarts it.
                raise KafkaException(err)
        return [m for m in (first, *rest) if m.error() is None]

    @staticmethod
    def _commit_acknowledged(consumer: Consumer, pending: deque[_InFlight], final: bool = False) -> None:
        """Commit the offsets of the oldest batches whose results the broker has acknowledged."""
        done: dict[tuple[str, int], int] = {}
        while pending and pending[0].remaining <= 0:
            batch = pending.popleft()
            if batch.failure is not None:
                raise RuntimeError(f"ranked results were not acknowledged by the broker: {batch.failure}")
            for tp in batch.offsets:
                done[(tp.topic, tp.partition)] = max(done.get((tp.topic, tp.partition), 0), tp.offset)
        if done:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()],
                            asynchronous=not final)

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
        log.info("batch_ranked", queries=len(results), errors=errors,
                 model_version=version, batch_ms=round(seconds * 1000, 2),
                 latency_ms_max=round(max(r.latency_ms for r in results), 2))
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


def _published_at(msg: Message) -> float:
    kind, ms = msg.timestamp()
    return ms / 1000 if kind and ms > 0 else time.time()
