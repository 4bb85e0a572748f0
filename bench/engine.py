"""A whole engine of its own for a benchmark: isolated topics, Redis database and registry, the
engine's services started as real processes, and the probes a run needs (is the scorer ready,
is the catalog embedded, have the feature workers applied everything published, which version
does a scorer serve). Used by ``bench.trainer`` and ``bench.loop``.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from core import kafka
from core.events import RESULTS as RESULTS_CODEC
from core.events import Query, RankedResult, encode
from core.processes import Service, wait_until
from core.settings import Settings
from core.topics import route, topic_specs
from replay.to_events import TimedEvent
from streams.progress import Ends, applied_up_to
from streams.testing import environment


def engine_env(settings: Settings, registry: Path, port: int, max_candidates: int = 1000,
               **overrides: str) -> dict[str, str]:
    """The environment of every service of this engine: its topics, Redis and registry, consumer
    groups of its own (a group shared with another engine's processes would rebalance with
    them), the scorer on the CPU at ``port``."""
    tag = uuid.uuid4().hex[:6]
    return environment(settings) | {
        "SHOPRANK_MODEL_REGISTRY_DIR": str(registry),
        "SHOPRANK_SCORER_GROUP_ID": f"bench-scorer-{tag}",
        "SHOPRANK_STREAMS_GROUP_ID": f"bench-streams-{tag}",
        "SHOPRANK_EMBEDDER_GROUP_ID": f"bench-embedder-{tag}",
        "SHOPRANK_JOINER_GROUP_ID": f"bench-joiner-{tag}",
        "SHOPRANK_TRAINER_GROUP_ID": f"bench-trainer-{tag}",
        "SHOPRANK_SCORER_HTTP_PORT": str(port),
        "SHOPRANK_SCORER_DEVICE": "cpu",
        "SHOPRANK_SCORER_MAX_CANDIDATES": str(max(1000, max_candidates)),
        "SHOPRANK_LOG_LEVEL": "INFO",
    } | overrides


class Services:
    """Named ``shoprank`` services as processes (logs under ``logs``), stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Service] = {}

    def start(self, name: str, env: dict[str, str], command: str | None = None) -> Service:
        self.procs[name] = Service(env, self.logs / f"{name}.log", command=command or name)
        return self.procs[name]

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if not p.alive()]

    def check(self) -> None:
        """Raise, naming the log, when a service has died."""
        for p in self.procs.values():
            p.check()

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def scorer_status(port: int) -> dict[str, object] | None:
    """A scorer's /healthz (its model version), or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def wait_serving(port: int, version: str, timeout_s: float = 120.0) -> None:
    """Until the scorer at ``port`` serves ``version`` (a hot swap done)."""
    wait_until(lambda: (scorer_status(port) or {}).get("model_version") == version, timeout_s, 0.2,
               f"scorer :{port} serving {version}")


def publish_events(settings: Settings, events: Iterable[TimedEvent], producer: Producer | None = None) -> int:
    """Publish replay events to their topics (catalog, queries, interactions), acknowledged (a
    caller publishing often passes its producer: a new idempotent one holds its first send)."""
    producer = producer or kafka.producer(settings)
    n = 0
    for e in events:
        topic, key = route(settings, e.event)
        while True:
            try:
                producer.produce(topic, encode(e.event), key=key.encode())
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
    if producer.flush(60):
        raise RuntimeError("events unacknowledged after 60 s")
    return n


def topic_ends(consumer: Consumer, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """The end offset of every non-empty partition of ``topics`` now."""
    return Ends(consumer, topics).now()


def wait_features(settings: Settings, client: redis.Redis, topics: Sequence[str], timeout_s: float = 600.0,
                  consumer: Consumer | None = None) -> None:
    """Until the feature workers have applied everything published to ``topics`` so far."""
    own = consumer is None
    consumer = consumer or kafka.consumer(settings, group_id=f"bench-ends-{uuid.uuid4().hex[:6]}")
    try:
        applied_up_to(client, Ends(consumer, topics).now(), settings.features.shards, timeout_s)
    finally:
        if own:
            consumer.close()


def labeled_count(settings: Settings) -> int:
    consumer = kafka.consumer(settings, group_id=f"bench-count-{uuid.uuid4().hex[:6]}")
    try:
        return sum(high - low for low, high in kafka.watermarks(consumer, [settings.topics.labeled]).values())
    finally:
        consumer.close()


def advance_event_time(settings: Settings, to: datetime) -> None:
    """One empty result per partition at ``to``: each partition's event time moves past every
    window (a replay ends; a live shop's next searches would do the same)."""
    producer = kafka.producer(settings)
    for p in range(settings.topics.partitions):
        tick = RankedResult(query_id=f"bench-tick-{p}-{uuid.uuid4().hex[:6]}", user_id="bench-tick",
                            session_id="bench-tick", model_version="-", products=[], timestamp=to)
        producer.produce(settings.topics.results, encode(tick), partition=p)
    if producer.flush(30):
        raise RuntimeError("event-time ticks unacknowledged")


def ask(settings: Settings, text: str, candidates: list[str] | None, at: datetime, timeout_s: float = 60,
        retries: int = 1, user_id: str = "bench-shopper") -> RankedResult:
    """Publish one search and return its result from the results topic (asking again, up to
    ``retries`` times, when it gets no answer within ``timeout_s / retries``)."""
    for attempt in range(retries):
        try:
            return _ask_once(settings, text, candidates, at, timeout_s / retries, user_id)
        except TimeoutError:
            if attempt == retries - 1:
                raise
    raise AssertionError("unreachable")


def _ask_once(settings: Settings, text: str, candidates: list[str] | None, at: datetime,
              timeout_s: float, user_id: str) -> RankedResult:
    q = Query(query_id=f"bench-{uuid.uuid4().hex[:10]}", user_id=user_id, session_id="bench",
              text=text, candidates=candidates, timestamp=at)
    topic = settings.topics.results
    consumer = kafka.consumer(settings, group_id=f"bench-ask-{uuid.uuid4().hex[:6]}")
    try:
        # Read from each partition's end as it is *before* the search is sent.
        ends = [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1])
                for p in range(settings.topics.partitions)]
        consumer.assign(ends)
        kafka.send_acked(kafka.producer(settings), settings.topics.queries,
                         [(q.user_id.encode(), encode(q), None)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            if (r := RESULTS_CODEC.decode(msg.value())).query_id == q.query_id:
                return r
    finally:
        consumer.close()
    raise TimeoutError(f"no result for {text!r} within {timeout_s:.0f} s")


def delete_topics(settings: Settings, extra: Sequence[str] = ()) -> None:
    names = [t.name for t in topic_specs(settings)] + list(extra)
    admin = kafka.admin_client(settings)  # held: the futures need their client alive
    for name, future in admin.delete_topics(names, operation_timeout=60).items():
        try:
            future.result()
        except KafkaException as exc:  # figures matter more than tidiness
            print(f"could not delete {name}: {exc}", flush=True)

