"""``shoprank demo``: the main job end to end on the real Best Buy data.

1. topics; 2. a model version serving (trained here when there is none: the version whose
figures ``make eval`` reports); 3. the Best Buy catalog, searches and clicks replayed into Kafka
(skipped when Kafka already holds them: ids are stable, so a second replay would only be
recognised and ignored downstream); 4. a feature worker and a scorer started as real processes;
5. live traffic: test-period searches published as new queries at a steady rate, their ranked
results consumed from Kafka; 6. what came out: example rankings, latency, counts, and the
offline quality table. The processes are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from core import kafka
from core.commands import cmd_inspect, count_messages
from core.events import RESULTS, Query, RankedResult, encode
from core.settings import Settings
from core.topics import ensure_topics, topic_specs
from evaluation.ranker import SearchRow
from shoprank.processes import http_ready, stop_group

LiveRun = tuple[list[Query], list[RankedResult], dict[str, str]]  # queries, results, clicked product
LIVE_QUERIES = 300
LIVE_QPS = 50.0


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def ensure_model(settings: Settings) -> str:
    from core.registry import load_version, serving_version

    registry = settings.model.registry_dir
    version = serving_version(registry)
    if version is None:
        print("no model version is serving: training one (shoprank train; about 5 minutes on 2 idle cores)")
        subprocess.run([sys.executable, "-m", "shoprank", "train", "--no-announce"], check=True)
        version = serving_version(registry)
        if version is None:
            raise RuntimeError("training finished but no version was promoted")
    metrics = load_version(registry, version).manifest.get("metrics", {})
    print(f"serving {version} from {registry}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return version


def replay_if_needed(settings: Settings, force: bool) -> None:
    from replay.publisher import publish
    from replay.to_events import Stream, bestbuy_replay

    replay = bestbuy_replay(settings.data_dir)
    expected = sum(1 for e in replay.events if e.stream is Stream.INTERACTIONS)
    held = count_messages(settings, [settings.topics.interactions])[0].messages
    if held >= expected and not force:
        print(f"the interactions topic already holds {held:,} events (the replay has {expected:,}): "
              "not replaying again (--replay forces it)")
        return
    stats = publish(settings, replay, progress=sys.stderr.isatty())
    print(f"published {stats.catalog:,} catalog products and {stats.events:,} searches and clicks "
          f"in {stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)")


@contextmanager
def service(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """A ``shoprank`` subcommand as a real process (own process group, log file), stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shoprank", *args], stdout=log, stderr=log,
                                start_new_session=True, env={**os.environ, **(env or {})})
        print(f"started {name} (pid {proc.pid}, log {log_path})")
        try:
            yield
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        finally:
            stop_group(proc)
            print(f"stopped {name}")


def wait_for(check, what: str, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def features_settled(settings: Settings) -> bool:
    """True once the feature worker's applied-events counter stops moving."""
    from features.redis_store import connect

    client = connect(settings.redis)
    before = int(client.hget("stats", "applied") or 0)
    time.sleep(2.0)
    after = int(client.hget("stats", "applied") or 0)
    return after > 0 and after == before


def live_traffic(settings: Settings, n: int, qps: float) -> LiveRun:
    """Publish ``n`` test-period searches as new queries at ``qps``; collect their results.

    Returns the queries, their results, and the product each search's shopper really clicked.
    """
    from evaluation.splits import bestbuy_split

    warm_up, *rows = bestbuy_split(settings.data_dir).test[-(n + 1):]
    run = uuid.uuid4().hex[:6]

    def query(name: str, r: SearchRow) -> Query:
        user = r.user_id or "anonymous"
        return Query(query_id=f"demo-{run}-{name}", user_id=user, session_id=user, text=r.query,
                     timestamp=r.query_time)

    warm = query("warm-up", warm_up)
    queries = [query(str(i), r) for i, r in enumerate(rows)]
    consumer = kafka.consumer(settings, group_id=f"demo-{run}", **{"auto.offset.reset": "latest"})
    consumer.subscribe([settings.topics.results])
    wait_for(lambda: consumer.poll(0.2) is None and bool(consumer.assignment()), "results consumer", 30)
    producer = kafka.producer(settings, **{"linger.ms": 0})
    # A new idempotent producer holds its first send until the broker has given it a producer id
    # (about 0.5 s here), and a shop's frontend keeps its producer: the search before the measured
    # ones goes first, unmeasured, so the figures are the engine's and not this producer's start.
    producer.produce(settings.topics.queries, key=warm.user_id.encode(), value=encode(warm))
    producer.flush(10)
    started = time.monotonic()
    for i, q in enumerate(queries):
        time.sleep(max(0.0, started + i / qps - time.monotonic()))
        producer.produce(settings.topics.queries, key=q.user_id.encode(), value=encode(q))
        producer.poll(0)
    producer.flush(10)
    wanted = {q.query_id for q in queries}
    results: dict[str, RankedResult] = {}
    deadline = time.monotonic() + 60
    while len(results) < len(wanted) and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None and (r := RESULTS.decode(msg.value())).query_id in wanted:
            results[r.query_id] = r
    consumer.close()
    clicked = {q.query_id: r.product_id or "" for q, r in zip(queries, rows, strict=True)}
    return queries, [results[q.query_id] for q in queries if q.query_id in results], clicked


def show_results(settings: Settings, queries: list[Query], results: list[RankedResult],
                 clicked: dict[str, str]) -> None:
    """Counts, latency, and a few rankings with the product the shopper really clicked marked."""
    from evaluation.splits import bestbuy_split

    catalog = bestbuy_split(settings.data_dir).catalog
    title = {pid: p.title for pid, p in catalog.items()}
    latencies = np.array([r.latency_ms for r in results])
    errors = sum(1 for r in results if r.error)
    print(f"{len(results)}/{len(queries)} queries answered ({errors} errors), model "
          f"{sorted({r.model_version for r in results})}; publish-to-result latency: "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms")
    by_id = {r.query_id: r for r in results}
    for q in queries[:: max(1, len(queries) // 4)][:4]:
        r = by_id.get(q.query_id)
        if r is None or r.error:
            continue
        print(f"\n  query {q.text!r} (user {q.user_id[:8]}…):")
        for p in r.products[:5]:
            mark = "  <- clicked" if p.product_id == clicked.get(q.query_id) else ""
            name = title.get(p.product_id, p.product_id)[:70]
            print(f"    {p.position}. {name:70} score {p.score:7.3f}{mark}")


def show_quality() -> None:
    from evaluation import report

    entries = report.read_entries()
    if entries:
        print(report.markdown_table(entries))
    else:
        print("no quality figures yet: run `make eval`")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    _stage("topics")
    created = ensure_topics(kafka.admin_client(settings), topic_specs(settings))
    print(f"{len(topic_specs(settings))} topics ready ({len(created)} created)")
    _stage("model")
    ensure_model(settings)
    _stage("replay the Best Buy search log (Aug-Oct 2011) into Kafka")
    replay_if_needed(settings, force=args.replay)
    _stage("what arrived, per topic")
    cmd_inspect(args, settings)
    logs = settings.var_dir / "demo"
    port = str(settings.scorer.http_port)
    with service("streams", ["streams"], logs), service("scorer", ["scorer"], logs):
        _stage("feature worker: catalog, searches and clicks -> Redis")
        wait_for(lambda: features_settled(settings), "feature worker", 300)
        print("features settled in Redis")
        _stage(f"live traffic: {args.queries} test-period searches at {args.qps:.0f} queries/s through Kafka")
        wait_for(lambda: http_ready(f"http://127.0.0.1:{port}/readyz"), "scorer", 120)
        queries, results, clicked = live_traffic(settings, args.queries, args.qps)
        show_results(settings, queries, results, clicked)
    _stage("ranking quality, offline (make eval; bench/results/quality.json)")
    show_quality()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the Best Buy data")
    p.add_argument("--replay", action="store_true", help="replay the dataset even if Kafka already holds it")
    p.add_argument("--queries", type=int, default=LIVE_QUERIES, help="live queries to send")
    p.add_argument("--qps", type=float, default=LIVE_QPS, help="their rate")
    p.set_defaults(func=cmd_demo)
