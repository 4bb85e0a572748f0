"""Open-loop load through Kafka for the scorer benchmark: paced query publishes, results consumed.

One producer thread publishes Query events at a fixed rate (open loop: a slow scorer does not
slow the sender, so overload shows up as latency and consumer lag, as it would in production).
One consumer thread reads the results topic. Latency of a query = the time its ranked result
was consumed minus the time of its ``produce()`` call, both on this process's monotonic clock.
The consumer only pulls the ``query_id`` (and ``error``) out of each result, so reading
100-product results costs the generator little next to the scorer it measures.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import msgspec
import numpy as np
import structlog
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from core import kafka
from core.events import Query, encode
from core.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class QuerySpec:
    """What one published query carries (a fresh ``query_id`` is added at send time)."""

    text: str
    user_id: str
    timestamp: datetime
    candidates: tuple[str, ...]


class _Ack(msgspec.Struct):
    """The part of a ranked result the generator reads; msgspec skips the products unparsed."""

    query_id: str
    error: str | None = None
    model_version: str | None = None


_ACK = msgspec.json.Decoder(_Ack)


@dataclass
class StepResult:
    """One offered rate: what was sent in the measured window and what came back."""

    offered_qps: float
    seconds: float
    sent: int
    answered: int
    errors: int
    achieved_qps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    lag_max: int
    in_flight_max: int
    unanswered: int
    drain_s: float

    def held(self, p99_limit_ms: float, min_ratio: float) -> bool:
        """The rate is sustained: p99 within the limit, throughput kept up, every query answered."""
        return (self.p99_ms is not None and self.p99_ms <= p99_limit_ms and self.unanswered == 0
                and self.achieved_qps >= min_ratio * self.offered_qps)

    def row(self) -> dict[str, float | int | None]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class LoadGenerator:
    """Publishes ``specs`` round-robin at a steady rate and matches results to their queries."""

    def __init__(self, settings: Settings, specs: Sequence[QuerySpec], scorer_group: str) -> None:
        self.settings = settings
        self.specs = list(specs)
        self.scorer_group = scorer_group
        self._producer = kafka.producer(settings, **{"linger.ms": 0, "compression.type": "none"})
        self._received: dict[str, float] = {}
        self._errors: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._next_spec = 0
        self.sample: bytes | None = None  # one full ranked result, for the caller to check
        self.sent_texts: list[str] = []  # every query text published, in order
        self.deliveries: Counter[str] = Counter()  # query_id -> results read (more than 1: a duplicate)
        self.served_by: Counter[str | None] = Counter()  # model_version -> results read
        self.last_sent: dict[str, float] = {}  # the last step's query_id -> produce-call time
        self._reader = threading.Thread(target=self._read, name="results-reader", daemon=True)
        self._lag_consumer = kafka.consumer(settings, group_id=scorer_group)  # never subscribes
        self._parts = [TopicPartition(settings.topics.queries, p) for p in range(settings.topics.partitions)]

    # --- results ---------------------------------------------------------------------------

    def start(self) -> None:
        self._reader.start()

    def close(self) -> None:
        self._stopping.set()
        self._reader.join(timeout=10)
        self._producer.flush(10)
        self._lag_consumer.close()

    def _read(self) -> None:
        t = self.settings.topics
        consumer: Consumer = kafka.consumer(self.settings, group_id=f"bench-reader-{uuid.uuid4().hex[:8]}",
                                            **{"fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        # Assigned, not subscribed: no group rebalance to wait for, reading from the end.
        consumer.assign([TopicPartition(t.results, p, OFFSET_END) for p in range(t.partitions)])
        try:
            while not self._stopping.is_set():
                # poll() returns as soon as one result is there (consume(n, timeout) would wait for n
                # or the whole timeout, adding its wait to every latency); then take what else is ready.
                first = consumer.poll(0.05)
                if first is None:
                    continue
                for msg in [first, *consumer.consume(1000, timeout=0)]:
                    now = time.perf_counter()
                    if msg.error() is not None:
                        continue
                    ack = _ACK.decode(msg.value())
                    with self._lock:
                        self._received.setdefault(ack.query_id, now)
                        self.deliveries[ack.query_id] += 1
                        self.served_by[ack.model_version] += 1
                        if ack.error:
                            self._errors.add(ack.query_id)
                        elif self.sample is None:
                            self.sample = msg.value()
        finally:
            consumer.close()

    def lag(self) -> int:
        """The scorer group's consumer lag on the queries topic (committed offsets vs high watermark)."""
        total = 0
        for tp in self._lag_consumer.committed(self._parts, timeout=5):
            _, high = self._lag_consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                               timeout=5, cached=False)
            committed = tp.offset if tp.offset >= 0 else 0
            total += max(0, high - committed)
        return total

    # --- publishing ------------------------------------------------------------------------

    def _publish(self, tag: str, rate: float, seconds: float, sent: dict[str, float]) -> None:
        """Publish at ``rate`` for ``seconds``; ``sent`` gets query_id -> produce-call time."""
        n = int(rate * seconds)
        topic = self.settings.topics.queries
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            spec = self.specs[self._next_spec % len(self.specs)]
            self._next_spec += 1
            qid = f"{tag}-{i}"
            query = Query(query_id=qid, user_id=spec.user_id, session_id=spec.user_id, text=spec.text,
                          candidates=list(spec.candidates), timestamp=spec.timestamp)
            payload = encode(query)
            self.sent_texts.append(spec.text)
            sent[qid] = time.perf_counter()
            self._producer.produce(topic, key=spec.user_id.encode(), value=payload)
            self._producer.poll(0)
        self._producer.flush(30)

    def warm(self, rate: float, seconds: float, timeout_s: float = 60.0) -> int:
        """Unmeasured traffic (caches, allocator, batch shapes); returns how many were answered."""
        sent: dict[str, float] = {}
        self._publish(f"warm-{uuid.uuid4().hex[:6]}", rate, seconds, sent)
        self._wait_for(sent, timeout_s)
        with self._lock:
            return sum(1 for q in sent if q in self._received)

    def _wait_for(self, sent: dict[str, float], timeout_s: float) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            with self._lock:
                if all(q in self._received for q in sent):
                    break
            time.sleep(0.05)
        return time.perf_counter() - started

    def latencies(self, sent: dict[str, float]) -> list[tuple[float, float | None]]:
        """(produce-call time, publish-to-result ms or None when unanswered) of each query in ``sent``."""
        with self._lock:
            return [(t, (self._received[q] - t) * 1000 if q in self._received else None)
                    for q, t in sent.items()]

    def step(self, rate: float, seconds: float, drain_s: float = 60.0) -> StepResult:
        """Offer ``rate`` queries/s for ``seconds``; wait up to ``drain_s`` for the stragglers."""
        sent: dict[str, float] = {}
        tag = f"r{int(rate)}-{uuid.uuid4().hex[:6]}"
        publisher = threading.Thread(target=self._publish, args=(tag, rate, seconds, sent), daemon=True)
        lag_max, in_flight_max = 0, 0
        t0 = time.perf_counter()
        publisher.start()
        while publisher.is_alive():
            time.sleep(0.5)
            try:
                lag_max = max(lag_max, self.lag())
            except Exception as exc:  # a lag probe failing must not end the step
                log.warning("lag_probe_failed", reason=str(exc))
            with self._lock:
                in_flight_max = max(in_flight_max, sum(1 for q in list(sent) if q not in self._received))
        publisher.join()
        t_end = t0 + seconds
        drained = self._wait_for(sent, drain_s)
        with self._lock:
            lat = np.array([(self._received[q] - t) * 1000 for q, t in sent.items() if q in self._received])
            in_window = sum(1 for q in sent if q in self._received and self._received[q] <= t_end)
            errors = sum(1 for q in sent if q in self._errors)
        self.last_sent = sent
        pct = (lambda p: float(np.percentile(lat, p))) if lat.size else (lambda p: None)
        return StepResult(
            offered_qps=rate, seconds=seconds, sent=len(sent), answered=int(lat.size), errors=errors,
            achieved_qps=in_window / seconds, p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
            max_ms=float(lat.max()) if lat.size else None, lag_max=lag_max, in_flight_max=in_flight_max,
            unanswered=len(sent) - int(lat.size), drain_s=drained,
        )
