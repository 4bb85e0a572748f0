"""A search log replayed through the *running* engine in event time: each search is ranked by the
scorer before its clicks exist, and the clicks follow as a frontend sends them.

The replay walks the log's searches and clicks in time order, in steps. A step publishes its
searches as query events (with the candidates the replay gives them), waits until the scorer's
result for each has arrived on the results topic, then publishes the clicks of the step, each
with the ``query_id`` of its search and the ``position`` its product had in the served list. A
click therefore reaches the feature workers only after every search before it was ranked: no
search is ranked with a click from its future. A step ends after ``step_searches`` searches, or
when a search would fall more than ``step_s`` of event time after the step's first search (the
clicks up to the next step's first search are the step's): within a step, a search does not yet
see the clicks of the searches just before it (as a busy shop's features lag its clicks by a few
seconds); with ``step_searches=1`` a search sees every click that happened before it.

Nothing here knows Best Buy: the log is :class:`replay.to_events.TimedEvent` queries and clicks.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
import structlog
from confluent_kafka import TopicPartition

from core import kafka
from core.events import RESULTS, Click, InvalidEvent, Query, RankedResult, encode
from core.progress import progress
from core.settings import Settings
from core.topics import route
from replay.to_events import Stream, TimedEvent

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Served:
    """What the engine answered to one replayed search: its version, latency, and the position
    of each product the shopper clicked after it (None: not in the served list)."""

    model_version: str
    latency_ms: float
    clicked: dict[str, int | None]
    error: str | None = None


@dataclass
class LiveReplayStats:
    searches: int = 0
    answered: int = 0
    unanswered: int = 0
    clicks: int = 0
    clicks_shown: int = 0  # clicks whose product was in the list served to their search
    steps: int = 0
    seconds: float = 0.0
    first: datetime | None = None
    last: datetime | None = None
    served: dict[str, Served] = field(default_factory=dict)


class ResultCollector(threading.Thread):
    """Follows the results topic (or ``topic``) from its end, keeping what ``want`` asks of each
    awaited result."""

    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        super().__init__(name="replay-results", daemon=True)
        self._consumer = kafka.consumer(settings, group_id=f"replay-{uuid.uuid4().hex[:8]}",
                                        **{"fetch.wait.max.ms": 5})
        # Each partition from its end as it is now, assigned explicitly: a subscription's "latest"
        # is resolved a round trip after assignment and would miss a result produced meanwhile.
        topic = topic or settings.topics.results
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([
            TopicPartition(topic, p, self._consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1])
            for p in partitions])
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._awaited: dict[str, dict[str, None]] = {}  # query id -> clicked products
        self.got: dict[str, Served] = {}

    def expect(self, query_id: str, clicked: Sequence[str]) -> None:
        with self._cond:
            self._awaited[query_id] = dict.fromkeys(clicked)

    def wait(self, query_ids: Sequence[str], timeout_s: float) -> list[str]:
        """Wait until every one of ``query_ids`` is answered; returns those still unanswered."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [q for q in query_ids if q not in self.got]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(min(left, 0.5))

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                # consume() waits for all 500 or the timeout: keep the timeout short, a step waits on it
                msgs = self._consumer.consume(500, timeout=0.005)
                got = []
                for m in msgs:
                    if m.error() is None:
                        try:
                            got.append(RESULTS.decode(m.value() or b""))
                        except InvalidEvent:
                            continue
                if got:
                    self._note(got)
        finally:
            self._consumer.close()

    def _note(self, results: list[RankedResult]) -> None:
        with self._cond:
            for r in results:
                clicked = self._awaited.pop(r.query_id, None)
                if clicked is None:
                    continue
                position = {p.product_id: p.position for p in r.products}
                self.got[r.query_id] = Served(r.model_version, r.latency_ms,
                                              {pid: position.get(pid) for pid in clicked}, r.error)
            self._cond.notify_all()

    def stop(self) -> None:
        self._stopping.set()


class LiveReplay:
    """Replays queries and clicks through the engine (see the module docstring)."""

    def __init__(self, settings: Settings, candidates: Sequence[str] | None = None,
                 step_searches: int = 16, step_s: float = 600.0, result_timeout_s: float = 60.0,
                 progress: bool = True, also_await: Sequence[str] = ()) -> None:
        self.settings = settings
        self.candidates = list(candidates) if candidates is not None else None
        self.step_searches = step_searches
        self.step_s = step_s
        self.result_timeout_s = result_timeout_s
        self.progress = progress
        self.producer = kafka.producer(settings, **{"linger.ms": 1})
        self.collector = ResultCollector(settings)
        # Results topics of other scorers ranking the same searches (e.g. a version compared
        # with the serving one): a step's clicks wait for their answers too.
        self.others = {topic: ResultCollector(settings, topic) for topic in also_await}

    def __enter__(self) -> LiveReplay:
        for c in (self.collector, *self.others.values()):
            c.start()
        return self

    def __exit__(self, *_: object) -> None:
        for c in (self.collector, *self.others.values()):
            c.stop()
            c.join(10)
        self.producer.flush(30)

    def run(self, log_events: Sequence[TimedEvent],
            on_step: Callable[[LiveReplayStats], None] | None = None) -> LiveReplayStats:
        """Replay ``log_events`` (queries and clicks, in time order); ``on_step`` is called after
        each step's clicks are published (e.g. to pause at a day boundary for a training cycle)."""
        stats = LiveReplayStats()
        clicked: dict[str, list[str]] = {}
        for e in log_events:
            if e.stream is Stream.INTERACTIONS:
                clicked.setdefault(e.event.query_id or "", []).append(e.event.product_id)  # type: ignore[union-attr]
        started = time.monotonic()
        searches = sum(1 for e in log_events if e.stream is Stream.QUERIES)
        bar = progress(total=searches, desc="live replay", unit="search", enabled=self.progress, leave=False)
        step_q: list[Query] = []
        step_c: list[Click] = []
        step_start: float | None = None
        for e in log_events:
            t = e.timestamp.timestamp()
            full = len(step_q) >= self.step_searches
            too_long = step_start is not None and t - step_start > self.step_s
            # A step ends where a search opens the next one: the clicks between its last search
            # and that one are published with it, so the next search sees them (ended at a click,
            # a step would send the next search before the clicks that happened before it).
            if e.stream is Stream.QUERIES and (full or too_long) and (step_q or step_c):
                self._step(step_q, step_c, clicked, stats)
                bar.set_postfix(answered=stats.answered, event_time=e.timestamp.isoformat())
                bar.update(len(step_q))
                if on_step is not None:
                    on_step(stats)
                step_q, step_c, step_start = [], [], None
            if step_start is None:
                step_start = t
            if e.stream is Stream.QUERIES:
                q: Query = e.event  # type: ignore[assignment]
                if self.candidates is not None:
                    q = msgspec.structs.replace(q, candidates=self.candidates)
                step_q.append(q)
            elif e.stream is Stream.INTERACTIONS:
                step_c.append(e.event)  # type: ignore[arg-type]
            stats.first = stats.first or e.timestamp
            stats.last = e.timestamp
        if step_q or step_c:
            self._step(step_q, step_c, clicked, stats)
            bar.set_postfix(answered=stats.answered, event_time=stats.last and stats.last.isoformat())
            bar.update(len(step_q))
            if on_step is not None:
                on_step(stats)
        bar.close()
        stats.seconds = time.monotonic() - started
        stats.served = dict(self.collector.got)
        return stats

    def _produce(self, event: Query | Click) -> None:
        topic, key = route(self.settings, event)
        self.producer.produce(topic, encode(event), key=key.encode())

    def _step(self, queries: list[Query], clicks: list[Click], clicked: dict[str, list[str]],
              stats: LiveReplayStats) -> None:
        for q in queries:
            for collector in (self.collector, *self.others.values()):
                collector.expect(q.query_id, clicked.get(q.query_id, []))
            self._produce(q)
        self.producer.flush(30)
        ids = [q.query_id for q in queries]
        missing = self.collector.wait(ids, self.result_timeout_s)
        for other in self.others.values():
            other.wait(ids, self.result_timeout_s)
        stats.searches += len(queries)
        stats.unanswered += len(missing)
        stats.answered += len(queries) - len(missing)
        stats.steps += 1
        if missing:
            log.warning("searches_unanswered", count=len(missing), first=missing[0])
        for c in clicks:
            served = self.collector.got.get(c.query_id or "")
            position = served.clicked.get(c.product_id) if served is not None else None
            if position is not None:
                c = msgspec.structs.replace(c, position=position)
                stats.clicks_shown += 1
            stats.clicks += 1
            self._produce(c)
        # Acknowledged before ``on_step``: a caller waiting for the engine to apply the step's
        # clicks (each search seeing every click before it) knows where they are on the broker.
        if self.producer.flush(30):
            raise RuntimeError("a replay step's clicks unacknowledged after 30 s")


def read_results(settings: Settings, topic: str | None = None,
                 wanted: set[str] | None = None) -> dict[str, RankedResult]:
    """What the engine answered, read back from the results topic (or ``topic``) from its start
    to its end now: the first result of each query id (of ``wanted`` ids only, when given)."""
    topic = topic or settings.topics.results
    consumer = kafka.consumer(settings, group_id=f"replay-read-{uuid.uuid4().hex[:8]}")
    out: dict[str, RankedResult] = {}
    try:
        ends = kafka.watermarks(consumer, [topic])
        consumer.assign([TopicPartition(t, p, low) for (t, p), (low, _) in ends.items()])
        left = {tp: high for tp, (_, high) in ends.items()}
        while left:
            for m in consumer.consume(2000, timeout=1.0):
                if m.error() is not None:
                    continue
                if m.offset() >= left.get((m.topic(), m.partition()), 0) - 1:
                    left.pop((m.topic(), m.partition()), None)
                try:
                    r = RESULTS.decode(m.value() or b"")
                except InvalidEvent:
                    continue
                if (wanted is None or r.query_id in wanted) and r.query_id not in out:
                    out[r.query_id] = r
    finally:
        consumer.close()
    return out
