"""``shoprank demo``: the main job end to end on the real Best Buy data, showing what the engine
knew at the time.

1. a model version serving (trained here when there is none: the version whose figures
``make eval`` reports); 2. a fresh engine of its own: topics ``demo.<run>.*`` and a Redis
database (``--redis-db``, emptied first), so nothing a search is ranked with comes from its
future; 3. the Best Buy log up to the live window (the catalog, every search and click before the
first of the last N test-period searches) published into Kafka; 4. a feature worker and a scorer
started as real processes, the feature worker applying that log; 5. live traffic in event time:
the last N test-period searches, each published as a query and ranked by the running scorer
*before* its clicks exist, then its clicks, sent as a frontend sends them (with the query id and
the served position); the next search waits until the feature worker has applied them; 6. what
came out: example rankings with the product the shopper went on to click marked, the
publish-to-result latency, the live searches' MAP@5, the offline quality table, and where the
event-time evaluation (``make loop-eval``) wrote its figures and plots; 7. a report with plots
(``var/demo/report/report.md``: shoprank.report) and where the console is. The processes are
stopped at the end and the run's topics deleted (``--keep-topics`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from confluent_kafka import KafkaException

from core import kafka
from core.commands import cmd_inspect
from core.events import Query, RankedResult
from core.processes import Service
from core.settings import ROOT, Settings, TopicSettings
from core.topics import TOPIC_KEYS, ensure_topics, topic_specs

if TYPE_CHECKING:
    from shoprank.report import DemoFigures

LIVE_QUERIES = 300
DEMO_REDIS_DB = 1
LOOP_JSON = ROOT / "bench" / "results" / "loop.json"
LOOP_PLOTS = ("loop_map5_per_day.png", "loop_latency.png")


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


def demo_settings(settings: Settings, redis_db: int) -> Settings:
    """This run's own topics (``demo.<run>.<kind>``) and Redis database, the rest as configured."""
    tag = uuid.uuid4().hex[:6]
    names = {k: f"demo.{tag}.{k}" for k in TOPIC_KEYS}
    topics = TopicSettings(**names, partitions=settings.topics.partitions)
    url = settings.redis.url.rsplit("/", 1)[0] + f"/{redis_db}"
    return settings.model_copy(update={"topics": topics,
                                       "redis": settings.redis.model_copy(update={"url": url})})


def environment(settings: Settings, catalog_size: int) -> dict[str, str]:
    """The services' environment: this run's topics, Redis database and consumer groups."""
    tag = uuid.uuid4().hex[:6]
    env = dict(os.environ)
    env.update({f"SHOPRANK_TOPIC_{k.upper()}": getattr(settings.topics, k) for k in TOPIC_KEYS})
    env.update({
        "SHOPRANK_REDIS_URL": settings.redis.url,
        "SHOPRANK_STREAMS_GROUP_ID": f"demo-streams-{tag}",
        "SHOPRANK_SCORER_GROUP_ID": f"demo-scorer-{tag}",
        # Each live search reads the respelling dictionary as it is (the scorer's default reloads
        # it once a minute of wall time: in a replay, that is hours of the shop's time).
        "SHOPRANK_FEATURES_SPELLING_REFRESH_S": "0.001",
        # Each search ranks the whole catalog, as `make eval` and `make loop-eval` rank it.
        "SHOPRANK_SCORER_RETRIEVE_K": str(catalog_size),
    })
    return env


@contextmanager
def service(name: str, log_dir: Path, env: dict[str, str]) -> Iterator[Service]:
    """A ``shoprank`` service as a real process for the demo's run, stopped on exit."""
    with Service(env, log_dir / f"{name}.log", command=name, log_mode="w") as proc:
        print(f"started {name} (pid {proc.pid}, log {proc.log_path})")
        yield proc
        proc.check()
    print(f"stopped {name}")


@dataclass
class Window:
    """The live window: the last N test-period searches that were clicked, and their clicks."""

    live: list  # TimedEvent, in event time
    clicked: dict[str, list[str]]  # query id -> products clicked after it, in click order


def split_log(settings: Settings, n: int):  # type: ignore[no-untyped-def]
    """The log before the live window (a Replay: catalog, then events) and the window."""
    from replay.to_events import Replay, Stream, bestbuy_replay

    replay = bestbuy_replay(settings.data_dir)
    clicked: dict[str, list[str]] = {}
    for e in replay.events:
        if e.stream is Stream.INTERACTIONS:
            clicked.setdefault(e.event.query_id or "", []).append(e.event.product_id)
    searches = [e for e in replay.events if e.stream is Stream.QUERIES and e.event.query_id in clicked]
    live_ids = {e.event.query_id for e in searches[-n:]}
    start = searches[-n].timestamp
    history = [e for e in replay.events if e.timestamp < start]
    live = [e for e in replay.events if e.timestamp >= start and e.event.query_id in live_ids]
    return Replay(replay.catalog, history), Window(live, {q: clicked[q] for q in live_ids})


def apply_log(settings: Settings, log, progress: bool) -> None:  # type: ignore[no-untyped-def]
    """Publish the log and wait until the feature worker has applied all of it."""
    from features.redis_store import connect
    from replay.publisher import publish
    from streams.progress import Ends, applied_up_to

    stats = publish(settings, log, progress=progress)
    print(f"published {stats.catalog:,} catalog products and {stats.events:,} searches and clicks "
          f"in {stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)")
    consumer = kafka.consumer(settings, group_id=f"demo-ends-{uuid.uuid4().hex[:6]}")
    t = settings.topics
    try:
        started = time.monotonic()
        applied_up_to(connect(settings.redis), Ends(consumer, [t.catalog, t.queries, t.interactions]).now(),
                      settings.features.shards, timeout_s=600, poll_s=0.2)
    finally:
        consumer.close()
    print(f"the feature worker applied it all ({time.monotonic() - started:.1f} s after publishing)")


def live_traffic(settings: Settings, window: Window,
                 progress: bool) -> tuple[list[Query], list[RankedResult]]:
    """The live window in event time: each search ranked before its clicks, which follow; the
    next search once the feature worker has applied them. Returns the searches and results."""
    from features.redis_store import connect
    from replay.live import LiveReplay, LiveReplayStats, read_results
    from replay.to_events import TimedEvent
    from streams.progress import Ends, applied_up_to

    client = connect(settings.redis)
    consumer = kafka.consumer(settings, group_id=f"demo-ends-{uuid.uuid4().hex[:6]}")
    t = settings.topics
    ends = Ends(consumer, [t.queries, t.interactions, t.results])

    def settle(_: LiveReplayStats) -> None:
        applied_up_to(client, ends.now(), settings.features.shards)

    first = window.live[0]
    # One unmeasured search first (stamped before the window, by a shopper of its own): it proves
    # the scorer's new consumer group reads, and warms the publishing producer (a new idempotent
    # producer holds its first send ~0.5 s for its producer id: a frontend keeps its producer).
    warm = Query(query_id=f"demo-warm-up-{uuid.uuid4().hex[:6]}", user_id="demo-warm-up", session_id="demo",
                 text="warm up", timestamp=first.timestamp - timedelta(seconds=1))
    try:
        with LiveReplay(settings, step_searches=1, result_timeout_s=10.0, progress=progress) as live:
            for _ in range(12):
                if live.run([TimedEvent(warm.timestamp, warm.query_id, warm)]).answered:
                    break
                warm = msgspec.structs.replace(warm, query_id=f"demo-warm-up-{uuid.uuid4().hex[:6]}")
            stats = live.run(window.live, on_step=settle)
    finally:
        consumer.close()
    queries = [e.event for e in window.live if isinstance(e.event, Query)]
    results = read_results(settings, wanted={q.query_id for q in queries})
    print(f"{stats.searches} searches ranked before their {stats.clicks} clicks were sent "
          f"({stats.unanswered} unanswered) in {stats.seconds:.1f} s")
    return queries, [results[q.query_id] for q in queries if q.query_id in results]


def show_results(settings: Settings, version: str, queries: list[Query], results: list[RankedResult],
                 clicked: dict[str, list[str]]) -> DemoFigures:
    """Counts, latency, quality of these searches, and a few rankings with what the shopper
    clicked next marked (the engine had not seen that click when it ranked); returns the figures
    for the report."""
    from replay import bestbuy
    from shoprank.report import demo_figures

    title = {sku: p.name for sku, p in bestbuy.load_catalog(settings.data_dir).items()}
    figures = demo_figures(version, queries, results, clicked)
    print(f"{figures.answered}/{figures.asked} searches answered ({figures.errors} errors), model "
          f"{sorted({r.model_version for r in results})}; publish-to-result latency: "
          f"p50 {figures.percentile(50):.1f} ms, p99 {figures.percentile(99):.1f} ms")
    by_id = {r.query_id: r for r in results}
    s = figures.quality
    print(f"these {s['searches']} searches' {s['clicks']} clicks: MAP@5 {s['map@5']:.4f}, NDCG@10 "
          f"{s['ndcg@10']:.4f}, MRR {s['mrr']:.4f} (each ranked before its click reached the engine)")
    for q in queries[:: max(1, len(queries) // 4)][:4]:
        r = by_id.get(q.query_id)
        if r is None or r.error:
            continue
        print(f"\n  query {q.text!r} (user {q.user_id[:8]}…, {q.timestamp:%Y-%m-%d %H:%M}):")
        for p in r.products[:5]:
            mark = "  <- clicked next" if p.product_id in clicked.get(q.query_id, []) else ""
            name = title.get(p.product_id, p.product_id)[:70]
            print(f"    {p.position}. {name:70} score {p.score:7.3f}{mark}")
    return figures


def show_quality() -> None:
    from evaluation import report

    entries = report.read_entries()
    if entries:
        print(report.markdown_table(entries))
    else:
        print("no quality figures yet: run `make eval`")


def show_loop() -> None:
    """Where the event-time evaluation's figures are, and its headline when it has run."""
    if not LOOP_JSON.exists():
        print(f"not run yet: `make loop-eval` writes {LOOP_JSON.relative_to(ROOT)} and its plots")
        return
    loop = json.loads(LOOP_JSON.read_text())
    ci = loop.get("continuous_ci95")
    print(f"{LOOP_JSON.relative_to(ROOT)} ({loop.get('measured_at')}, {loop.get('searches')} searches over "
          f"{loop.get('days')} days): static MAP@5 {loop.get('static_map5')} (offline harness "
          f"{loop.get('offline_map5')}), continuous {loop.get('continuous_map5')} (vs static, 95% CI {ci}), "
          f"online query table {loop.get('query_table_map5')}, {loop.get('swaps')} swaps")
    for name in LOOP_PLOTS:
        path = LOOP_JSON.parent / name
        print(f"  plot: {path.relative_to(ROOT)}{'' if path.exists() else ' (missing)'}")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    _stage("model")
    version = ensure_model(settings)
    demo = demo_settings(settings, args.redis_db)
    _stage(f"a fresh engine: topics demo.*, Redis database {args.redis_db} (emptied)")
    admin = kafka.admin_client(demo)
    created = ensure_topics(admin, topic_specs(demo))
    print(f"{len(created)} topics created: {', '.join(created)}")
    import redis

    redis.Redis.from_url(demo.redis.url).flushdb()
    logs = settings.var_dir / "demo"
    progress = True  # a bar on a terminal, periodic log lines elsewhere (core.progress)
    try:
        log, window = split_log(settings, args.queries)
        env = environment(demo, len(log.catalog))
        first = window.live[0].timestamp
        with service("streams", logs, env):
            _stage(f"the Best Buy log before {first:%Y-%m-%d %H:%M} (the live window's first search) "
                   "into Kafka")
            apply_log(demo, log, progress)
            _stage("what arrived, per topic")
            cmd_inspect(args, demo)
            with service("scorer", logs, env) as scorer:
                scorer.wait_ready(f"http://127.0.0.1:{settings.scorer.http_port}/readyz", 120)
                _stage(f"live, in event time: the last {args.queries} test-period searches, each ranked by "
                       f"{version} before its clicks arrive")
                queries, results = live_traffic(demo, window, progress)
                figures = show_results(settings, version, queries, results, window.clicked)
    finally:
        if not args.keep_topics:
            names = [t.name for t in topic_specs(demo)]
            for name, future in admin.delete_topics(names, operation_timeout=60).items():
                try:
                    future.result()
                except KafkaException as exc:  # the demo's figures are shown already
                    print(f"could not delete {name}: {exc}")
    _stage("ranking quality, offline (make eval; bench/results/quality.json)")
    show_quality()
    _stage("ranking quality in event time, through the running engine (make loop-eval)")
    show_loop()
    _stage("the report")
    from shoprank.report import write_report

    console = f"http://{settings.console.host}:{settings.console.port}"
    report = write_report(settings.var_dir / "demo" / "report", figures, LOOP_JSON, console)
    print(f"report with plots: {report}")
    print(f"the console: run `shoprank console`, then open {console}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the Best Buy data")
    p.add_argument("--queries", type=int, default=LIVE_QUERIES, help="live searches to rank in event time")
    p.add_argument("--redis-db", type=int, default=DEMO_REDIS_DB,
                   help="the Redis database the demo's engine uses (emptied first)")
    p.add_argument("--keep-topics", action="store_true", help="leave the run's topics for inspection")
    p.set_defaults(func=cmd_demo)
