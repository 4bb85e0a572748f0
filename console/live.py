"""Live figures: throughput and p99 from the scorer's Prometheus endpoint, consumer lag from Kafka.

A sampler thread scrapes ``settings.console.scorer_metrics_url`` every ``scrape_s`` and keeps the
samples of the last ``live_window_s``: throughput is the queries counter's increase over that
window, p99 the 99th percentile of the latency histogram's increase (interpolated within a bucket,
as Prometheus' ``histogram_quantile`` does). Consumer lag is read from the broker itself: each
group's committed offsets against the partitions' end offsets, so it is known even when the
scorer is down (that is when it grows).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field

import structlog
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from core import kafka
from core.settings import Settings

log = structlog.get_logger(__name__)

QUERIES = "shoprank_queries"  # counter, by outcome (scorer.metrics)
LATENCY = "shoprank_query_latency_seconds"  # histogram
MODEL = "shoprank_model_version_info"
SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Sample:
    """One scrape: when, queries answered so far, the latency histogram's cumulative buckets."""

    at: float
    queries: float
    errors: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
    model_version: str | None


def parse(text: str, at: float) -> Sample:
    """The figures the console uses out of a Prometheus text exposition."""
    queries = errors = 0.0
    buckets: dict[float, float] = {}
    version = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == QUERIES and s.name.endswith("_total"):
                queries += s.value
                errors += s.value if s.labels.get("outcome") == "error" else 0.0
            elif family.name == LATENCY and s.name.endswith("_bucket"):
                buckets[float(s.labels["le"])] = s.value
            elif family.name == MODEL and s.value == 1:
                version = s.labels.get("version")
    return Sample(at, queries, errors, tuple(sorted(buckets.items())), version)


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The ``q`` quantile of cumulative histogram buckets, linear within the bucket it falls in
    (Prometheus' histogram_quantile); None when the histogram is empty. A quantile in the +Inf
    bucket reads as the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(new: Sample, old: Sample) -> tuple[tuple[float, float], ...]:
    before = dict(old.buckets)
    return tuple((b, max(0.0, c - before.get(b, 0.0))) for b, c in new.buckets)


@dataclass
class Live:
    """What the live page shows; ``error`` says why a figure is missing."""

    url: str
    samples: int = 0
    window_s: float = 0.0
    throughput: float | None = None
    p99_ms: float | None = None
    p99_since_start_ms: float | None = None
    queries: float | None = None
    errors: float | None = None
    model_version: str | None = None
    error: str | None = None
    history: list[tuple[float, float, float | None]] = field(default_factory=list)  # (at, q/s, p99 ms)


class Sampler(threading.Thread):
    """Scrapes the scorer's /metrics on a timer; :meth:`live` summarizes the window."""

    def __init__(self, url: str, every_s: float, window_s: float) -> None:
        super().__init__(name="console-sampler", daemon=True)
        self.url = url
        self.every_s = every_s
        self.window_s = window_s
        self._samples: deque[Sample] = deque()
        self._error: str | None = "not scraped yet"
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def scrape(self) -> None:
        at = time.time()
        try:
            with urllib.request.urlopen(self.url, timeout=SCRAPE_TIMEOUT_S) as resp:
                sample = parse(resp.read().decode(), at)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._error = f"the scorer's metrics at {self.url} do not answer ({exc})"
            return
        with self._lock:
            self._error = None
            if self._samples and sample.queries < self._samples[-1].queries:
                self._samples.clear()  # the scorer restarted: counters began again
            self._samples.append(sample)
            # One window's worth of samples, plus the history the plot shows (ten windows).
            while self._samples and self._samples[0].at < at - 10 * self.window_s:
                self._samples.popleft()

    def run(self) -> None:
        while not self._stop.is_set():
            self.scrape()
            self._stop.wait(self.every_s)

    def live(self) -> Live:
        with self._lock:
            samples, error = list(self._samples), self._error
        out = Live(url=self.url, error=error, samples=len(samples))
        if not samples:
            return out
        last = samples[-1]
        out.queries, out.errors, out.model_version = last.queries, last.errors, last.model_version
        p99 = quantile(0.99, last.buckets)
        out.p99_since_start_ms = None if p99 is None else p99 * 1000
        window = [s for s in samples if s.at >= last.at - self.window_s]
        first = window[0]
        if last.at > first.at:
            out.window_s = last.at - first.at
            out.throughput = (last.queries - first.queries) / out.window_s
            p99 = quantile(0.99, _delta(last, first))
            out.p99_ms = None if p99 is None else p99 * 1000
        for older, newer in itertools.pairwise(samples):
            if newer.at > older.at:
                p = quantile(0.99, _delta(newer, older))
                out.history.append((newer.at, (newer.queries - older.queries) / (newer.at - older.at),
                                    None if p is None else p * 1000))
        return out


@dataclass(frozen=True)
class GroupLag:
    """A consumer group's lag: messages past its committed offsets, per topic; ``error`` when the
    broker did not say."""

    name: str
    group_id: str
    topics: dict[str, int] = field(default_factory=dict)
    uncommitted: list[str] = field(default_factory=list)  # partitions with no committed offset yet
    error: str | None = None

    @property
    def total(self) -> int:
        return sum(self.topics.values())


def groups(settings: Settings) -> list[tuple[str, str]]:
    """The engine's consumer groups whose lag the console shows: (who, group id)."""
    return [("scorer", settings.scorer.group_id), ("feature workers", settings.streams.group_id),
            ("joiner", settings.joiner.group_id)]


def consumer_lag(settings: Settings) -> list[GroupLag]:
    """Each group's lag from the broker's committed offsets and end offsets."""
    timeout = settings.console.kafka_timeout_s
    admin = kafka.admin_client(settings)
    consumer = kafka.consumer(settings, group_id="shoprank-console")  # never subscribes: reads offsets
    out: list[GroupLag] = []
    try:
        try:  # one question first: a broker that is down fails every group at once, not in turn
            consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            reason = f"Kafka at {settings.kafka.bootstrap_servers} does not answer ({exc.args[0]})"
            return [GroupLag(name, group, error=reason) for name, group in groups(settings)]
        for name, group in groups(settings):
            try:
                futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                            request_timeout=timeout)
                committed = futures[group].result(timeout=timeout).topic_partitions or []
                lag: dict[str, int] = {}
                uncommitted = []
                for tp in committed:
                    _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                             timeout=timeout)
                    if tp.offset < 0:
                        uncommitted.append(f"{tp.topic}[{tp.partition}]")
                        continue
                    lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - tp.offset)
                out.append(GroupLag(name, group, dict(sorted(lag.items())), uncommitted))
            except (KafkaException, TimeoutError, RuntimeError) as exc:
                reason = exc.args[0] if exc.args else exc
                out.append(GroupLag(name, group, error=f"Kafka at {settings.kafka.bootstrap_servers} did "
                                                       f"not answer: {reason}"))
    finally:
        consumer.close()
    return out
