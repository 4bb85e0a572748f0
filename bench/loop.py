"""Proof in event time: ``make loop-eval`` -> bench/results/loop.json and plots beside it.

Best Buy's test period replayed through the *running* engine, in event-time order, one search
per step: each search is published as a query event and ranked by the running scorers before any
of its clicks exists; its clicks then follow as a frontend sends them (with the ``query_id`` and
the position of the served result), and the next search is published only once the feature
workers have applied everything published before it (so a search sees every click that happened
before it, and the figures do not depend on the host's speed). A fresh engine of its own: topics,
Redis database 8, registries under var/loop-eval.

Arms (``--arms``):

- ``static``: the version ``shoprank train`` produced (models/SERVING), never retrained, served by
  a scorer of its own (its own results and model-updates topics);
- ``continuous``: the same version at the start, served by the engine's scorer whose results the
  feature workers and the joiner read; at every simulated-day boundary (UTC midnight) the replay
  pauses, event time is moved to the boundary, the joiner's lists of the day are emitted, and
  ``shoprank trainer --once`` runs one cycle (fine-tune from the serving version on the labeled
  lists from the stream, gate, promote and announce, or reject); a promoted version hot-swaps into
  the running scorer before the replay resumes;
- ``query_table``: the online query table (evaluation.baselines), computed offline alongside on
  the same test clicks (it is not a served model);
- ``offline``: the offline harness's walk of the static version (bench.parity's ``harness``), per
  day, for the static arm to be held to.

Redis starts from the training period only: its catalog, searches and clicks are published to the
feature topics first (the scorers are not running yet, so nothing is ranked), except its last
``--label-days`` days, which are replayed through the engine (the serving version ranks them, the
joiner labels them): the continuous trainer's first cycle needs labeled lists from the stream.

Every figure comes from the results topics themselves (read back after the replay): MAP@5,
NDCG@10 and MRR over the test clicks (one row per click, misses included, as in the harness),
overall and per simulated day, and the continuous arm against the static one with a paired
bootstrap over searches.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import Consumer

from bench import engine
from bench.isolation import isolated_settings
from core import kafka
from core.layout import product_tower
from core.processes import wait_until
from core.registry import load_version, serving_version, set_serving
from core.settings import ROOT, Settings
from core.topics import ensure_topics, topic_specs
from evaluation import metrics
from evaluation.baselines import QueryTableRanker
from evaluation.loop import ServedClick, by_group, paired_bootstrap, summary
from evaluation.ranker import SearchRow
from evaluation.splits import BestBuySplit, bestbuy_split
from features.embeddings import ProductEmbeddings
from replay.live import LiveReplay, LiveReplayStats, read_results
from replay.to_events import Stream, TimedEvent, bestbuy_replay
from streams.progress import Ends, applied_up_to, joiner_reached

OUT = ROOT / "bench" / "results" / "loop.json"
WORK = ROOT / "var" / "loop-eval"
BENCH_DB = 8
ARMS = ("static", "continuous", "query_table", "offline")


def _print(msg: str) -> None:
    print(msg, flush=True)


def _day(t: datetime) -> str:
    return t.astimezone(UTC).date().isoformat()


# --- what is replayed --------------------------------------------------------------------------


@dataclass
class Data:
    split: BestBuySplit
    catalog: list[TimedEvent]
    history: list[TimedEvent]  # the training period up to --label-days: feature topics only
    labeled: list[TimedEvent]  # the training period's last --label-days: through the engine
    test: list[TimedEvent]  # the replayed test days
    days: list[str]
    rows: list[SearchRow]  # the test clicks of those days, in the harness's order
    search_days: list[str] = field(default_factory=list)  # day of each test search, replay order


def prepare(settings: Settings, days: int, label_days: float | None, with_unlabeled: bool) -> Data:
    split = bestbuy_split(settings.data_dir)
    replay = bestbuy_replay(settings.data_dir)
    events = replay.events
    if not with_unlabeled:
        # The searches whose click the dataset withholds are searches *with* a click nobody can
        # replay; the offline harness leaves them out, and so does this replay unless asked.
        clicked = {e.event.query_id for e in events if e.stream is Stream.INTERACTIONS}  # type: ignore[union-attr]
        events = [e for e in events if e.stream is not Stream.QUERIES or e.event.query_id in clicked]  # type: ignore[union-attr]
    cutoff = split.cutoff
    before = [e for e in events if e.timestamp < cutoff]
    after = [e for e in events if e.timestamp >= cutoff]
    all_days = sorted({_day(e.timestamp) for e in after if e.stream is Stream.QUERIES})
    chosen = all_days[:days] if days else all_days
    kept = {e.event.query_id for e in after  # type: ignore[union-attr]
            if e.stream is Stream.QUERIES and _day(e.timestamp) in chosen}
    test_queries = {e.event.query_id for e in after if e.stream is Stream.QUERIES}  # type: ignore[union-attr]
    test = [e for e in after if e.event.query_id in kept  # type: ignore[union-attr]
            or (e.stream is Stream.INTERACTIONS and e.event.query_id not in test_queries  # type: ignore[union-attr]
                and _day(e.timestamp) in chosen)]
    if label_days is None:
        history, labeled = [], before
    else:
        label_from = cutoff - timedelta(days=label_days)
        history = [e for e in before if e.timestamp < label_from]
        labeled = [e for e in before if e.timestamp >= label_from]
    rows = [r for r in split.test if r.query_id in kept]
    search_days = [_day(e.timestamp) for e in test if e.stream is Stream.QUERIES]
    return Data(split, replay.catalog, history, labeled, test, chosen, rows, search_days)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Swap:
    day: str  # the first day the cycle's outcome served
    outcome: str
    version: str | None
    reason: str
    cycle_s: float
    wall_s: float  # cycle plus the wait for the scorer to swap
    lists: int  # labeled lists on the topic when the cycle started
    gate: dict | None = None


def copy_version(source: Path, version: str, registry: Path) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / version, registry / version)
    set_serving(registry, version, reason="loop-eval: the version under test")


class Loop:
    """One run: the engine, its phases, the cycles at day boundaries."""

    def __init__(self, args: argparse.Namespace, data: Data) -> None:
        self.args = args
        self.data = data
        self.arms = set(args.arms)
        self.source = args.registry or Settings().model.registry_dir
        self.version = args.version or serving_version(self.source)
        if self.version is None:
            raise SystemExit(f"no version serves in {self.source}: run `shoprank train` first")
        shutil.rmtree(WORK, ignore_errors=True)
        self.main_registry = WORK / "registry"
        self.static_registry = WORK / "registry-static"
        copy_version(self.source, self.version, self.main_registry)
        s = isolated_settings(BENCH_DB)
        model = s.model.model_copy(update={"registry_dir": self.main_registry})
        self.settings = s.model_copy(update={"model": model})
        # Two scorers when both served arms run: the static one answers on a results topic of
        # its own (the feature workers and the joiner read the engine's) and hears no swaps.
        self.two_scorers = {"static", "continuous"} <= self.arms
        t = self.settings.topics
        self.static_settings = self.settings.model_copy(update={"topics": t.model_copy(update={
            "results": f"{t.results}-static", "model_updates": f"{t.model_updates}-static"})})
        if self.two_scorers:
            copy_version(self.source, self.version, self.static_registry)
        self.client = redis.Redis.from_url(self.settings.redis.url)
        self.swaps: list[Swap] = []
        self.phase_s: dict[str, float] = {}
        self.catalog_ids = [e.event.product_id for e in data.catalog]  # type: ignore[union-attr]
        common = {
            # Every search reads the respelling dictionary as it is (the default reloads it once a
            # wall-clock minute: replayed at ~30 searches/s, that is more than a simulated day).
            "SHOPRANK_FEATURES_SPELLING_REFRESH_S": str(args.spelling_refresh_s),
            # Queries carry no candidates: retrieval returns the whole catalog, ranked, as the
            # offline harness ranks it (candidates sent with the query would feed their order to
            # the model as the ``position`` feature, which the continuous trainer would switch on).
            "SHOPRANK_SCORER_RETRIEVE_K": str(len(self.catalog_ids)),
            # A cycle is bounded by its data (the newest --fresh-lists and --older-sample older
            # ones, one epoch), not by a wall-clock budget: the versions do not depend on the
            # host's speed (the product's default, 110 s, cuts fine-tuning wherever it is then).
            "SHOPRANK_TRAINER_MAX_CYCLE_S": str(args.max_cycle_s),
            "SHOPRANK_TRAINER_FRESH_LISTS": str(args.fresh_lists),
            "SHOPRANK_TRAINER_OLDER_SAMPLE": str(args.older_sample),
        }
        self.env = engine.engine_env(self.settings, self.main_registry, args.port, len(self.catalog_ids),
                                     **common)
        # --search-after-result: the feature workers read searches from a topic of their own, to
        # which a search goes once its results are in (its shopper's state can then not include
        # it when the scorer reads; by default both consume the same query event at once).
        self.feature_settings = self.settings
        self.streams_env = self.env
        if args.search_after_result:
            self.feature_settings = self.settings.model_copy(update={"topics": t.model_copy(update={
                "queries": f"{t.queries}-features"})})
            self.streams_env = self.env | {"SHOPRANK_TOPIC_QUERIES": self.feature_settings.topics.queries}
        self.static_env = engine.engine_env(self.static_settings, self.static_registry, args.port + 1,
                                            len(self.catalog_ids), **common)

    # --- phases ------------------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        s = self.settings
        admin = kafka.admin_client(s)
        ensure_topics(admin, topic_specs(s))
        if self.two_scorers:
            ensure_topics(admin, [t for t in topic_specs(self.static_settings)
                                  if t.name in (self.static_settings.topics.results,
                                                self.static_settings.topics.model_updates)])
        if self.args.search_after_result:
            ensure_topics(admin, [t for t in topic_specs(self.feature_settings)
                                  if t.name == self.feature_settings.topics.queries])
        self.client.flushdb()
        services = engine.Services(WORK / "logs")
        self.services = services
        ends_consumer = kafka.consumer(s, group_id=f"loop-ends-{uuid.uuid4().hex[:6]}")
        try:
            return self._run(services, ends_consumer)
        finally:
            ends_consumer.close()
            services.stop()
            if not self.args.keep_topics:
                extra = [self.static_settings.topics.results, self.static_settings.topics.model_updates]
                extra = extra if self.two_scorers else []
                if self.args.search_after_result:
                    extra.append(self.feature_settings.topics.queries)
                engine.delete_topics(s, extra)

    def _run(self, services: engine.Services, ends_consumer: Consumer) -> dict[str, object]:
        s, d = self.settings, self.data
        started = time.monotonic()
        services.start("streams", self.streams_env)
        services.start("embedder", self.env)
        if "continuous" in self.arms:
            services.start("joiner", self.env)
        engine.publish_events(s, d.catalog)
        tower = product_tower(load_version(self.main_registry, self.version).manifest)
        if tower is not None:
            embedded = ProductEmbeddings(self.client, tower.id)
            wait_until(lambda: embedded.count() >= len(self.catalog_ids) or services.dead(), 300, 0.5,
                       "the catalog embedded")
        fs = self.feature_settings
        feature_topics = [fs.topics.catalog, fs.topics.queries, fs.topics.interactions]
        n = engine.publish_events(fs, d.history)
        engine.wait_features(s, self.client, feature_topics, 900, ends_consumer)
        services.check()
        self.phase_s["history"] = round(time.monotonic() - started, 1)
        _print(f"training period: catalog and {n:,} searches and clicks applied to Redis "
               f"({self.phase_s['history']} s); {sum(e.stream is Stream.QUERIES for e in d.labeled):,} "
               "searches of its end to replay through the engine")

        first_at = (d.history or d.labeled or d.test)[0].timestamp - timedelta(seconds=1)
        services.start("scorer", self.env)
        self._warm(s, first_at)
        mark = time.monotonic()
        if d.labeled:
            with LiveReplay(s, step_searches=self.args.label_step, step_s=1800.0,
                            progress=True) as live:
                stats = live.run(d.labeled, on_step=self._forwarder(d.labeled))
            _print(f"training period's end through the engine: {stats.searches:,} searches "
                   f"({stats.unanswered} unanswered) in {stats.seconds:.0f} s")
        engine.wait_features(s, self.client, [*feature_topics, s.topics.results], 600, ends_consumer)
        self.phase_s["labeled"] = round(time.monotonic() - mark, 1)
        if self.two_scorers:
            services.start("scorer-static", self.static_env, command="scorer")
            self._warm(self.static_settings, first_at)
        services.check()

        mark = time.monotonic()
        also = [self.static_settings.topics.results] if self.two_scorers else []
        with LiveReplay(s, step_searches=self.args.step_searches, step_s=self.args.step_s,
                        progress=True, also_await=also) as live:
            settle = self._settler(live, ends_consumer, [fs.topics.queries, s.topics.interactions,
                                                         s.topics.results])
            stats = live.run(d.test, on_step=settle)
        self.phase_s["test"] = round(time.monotonic() - mark, 1)
        _print(f"test period: {stats.searches:,} searches ({stats.unanswered} unanswered), {stats.clicks:,} "
               f"clicks in {stats.seconds:.0f} s, {len(self.swaps)} cycles")
        services.check()
        return self._figures(stats, time.monotonic() - started)

    def _warm(self, settings: Settings, at: datetime) -> None:
        """A new scorer group reads from the queries topic's end once assigned: one answered search
        proves it reads. One candidate, stamped before the log starts (its impression has decayed
        away by the time anything is read)."""
        engine.ask(settings, "warm up", self.catalog_ids[:1], at, timeout_s=180, retries=18)

    def _settler(self, live: LiveReplay, consumer: Consumer, topics: list[str]):  # type: ignore[no-untyped-def]
        """The replay's ``on_step``: the next search waits until the feature workers applied
        everything published; at a day boundary, a training cycle first."""
        days = self.data.search_days
        watched = Ends(consumer, topics)
        forward = self._forwarder(self.data.test)

        def settle(stats: LiveReplayStats) -> None:
            forward(stats)
            if self.args.settle:
                applied_up_to(self.client, watched.now(), self.settings.features.shards)
            i = stats.searches
            if "continuous" in self.arms and 0 < i < len(days) and days[i] != days[i - 1]:
                self._cycle(days[i], consumer)

        return settle

    def _forwarder(self, log: Sequence[TimedEvent]):  # type: ignore[no-untyped-def]
        """An ``on_step`` that, with --search-after-result, publishes the searches the step had
        answered to the feature workers' own queries topic (acknowledged); else does nothing."""
        queries = [e for e in log if e.stream is Stream.QUERIES]
        done = 0
        producer = kafka.producer(self.settings, **{"linger.ms": 0})

        def forward(stats: LiveReplayStats) -> None:
            nonlocal done
            if self.args.search_after_result and stats.searches > done:
                engine.publish_events(self.feature_settings, queries[done:stats.searches], producer)
                done = stats.searches

        return forward

    def _cycle(self, day: str, consumer: Consumer) -> None:
        """Event time to ``day``'s midnight, the joiner's lists out, one trainer cycle, the swap."""
        s = self.settings
        started = time.monotonic()
        engine.advance_event_time(s, datetime.fromisoformat(day).replace(tzinfo=UTC))
        inputs = [s.topics.results, s.topics.interactions]
        ends = engine.topic_ends(consumer, inputs)
        wait_until(lambda: joiner_reached(self.client, ends, s.topics.partitions), 120, 0.05,
                   "joiner caught up")
        # Both inputs idle: the joiner's watermark moves to the boundary once idle_s has passed.
        time.sleep(s.joiner.idle_s + 1.5)
        wait_until(lambda: joiner_reached(self.client, ends, s.topics.partitions), 120, 0.05,
                   "joiner published")
        lists = engine.labeled_count(s)
        before = serving_version(self.main_registry)
        cycle_started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "shoprank", "trainer", "--once"], env=self.env, cwd=ROOT,
                             capture_output=True, text=True)
        cycle_s = time.monotonic() - cycle_started
        with (WORK / "logs" / "trainer.log").open("a") as f:
            f.write(f"--- cycle before {day}: exit {out.returncode}\n{out.stdout}{out.stderr}")
        after = serving_version(self.main_registry)
        outcome = {0: "promoted", 3: "rejected", 4: "nothing", 5: "lease_held"}.get(out.returncode, "failed")
        lines = (out.stdout.strip() or out.stderr.strip()).splitlines()
        last = lines[-1] if lines else ""
        newest = max((p for p in self.main_registry.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
        gate = None
        if newest.name != self.version and (newest / "manifest.json").exists():
            gate = json.loads((newest / "manifest.json").read_text()).get("gate")
        if after != before and after is not None:
            engine.wait_serving(self.args.port, after, 180)
        swap = Swap(day, outcome, newest.name if outcome in ("promoted", "rejected") else None,
                    str(last)[:300], round(cycle_s, 1), round(time.monotonic() - started, 1), lists, gate)
        self.swaps.append(swap)
        _print(f"cycle before {day}: {outcome} {swap.version or ''} in {cycle_s:.0f} s on {lists:,} lists: "
               f"{swap.reason[:160]}")
        self.services.check()

    # --- figures -----------------------------------------------------------------------------

    def _arm_clicks(self, topic: str) -> tuple[list[ServedClick], dict[str, object]]:
        rows = self.data.rows
        wanted = {r.query_id for r in rows}
        results = read_results(self.settings, topic, wanted)
        positions = {qid: {p.product_id: p.position for p in r.products} for qid, r in results.items()
                     if r.error is None}
        clicks = [ServedClick(r.query_id, _day(r.query_time),
                              positions.get(r.query_id, {}).get(r.product_id or "")) for r in rows]
        answered = [r for r in results.values() if r.error is None]
        latency = np.array([r.latency_ms for r in answered]) if answered else np.zeros(1)
        served_by: dict[str, int] = {}
        for r in answered:
            served_by[r.model_version] = served_by.get(r.model_version, 0) + 1
        info = {"unanswered": len(wanted) - len(answered),
                "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
                "latency_ms_p99": round(float(np.percentile(latency, 99)), 1), "served_by": served_by,
                "latency": [(r.timestamp.isoformat(), round(r.latency_ms, 2)) for r in
                            sorted(answered, key=lambda r: r.timestamp)]}
        return clicks, info

    def _figures(self, stats: LiveReplayStats, seconds: float) -> dict[str, object]:
        arms: dict[str, dict] = {}
        clicks: dict[str, list[ServedClick]] = {}
        latency: dict[str, list] = {}
        topics = {}
        if "continuous" in self.arms:
            topics["continuous"] = self.settings.topics.results
        if "static" in self.arms:
            topics["static"] = (self.static_settings.topics.results if self.two_scorers
                                else self.settings.topics.results)
        for arm, topic in topics.items():
            clicks[arm], info = self._arm_clicks(topic)
            latency[arm] = info.pop("latency")
            arms[arm] = {**summary(clicks[arm]), **info}
        if "query_table" in self.arms:
            clicks["query_table"] = query_table_clicks(self.data)
            arms["query_table"] = summary(clicks["query_table"])
        if "offline" in self.arms:
            clicks["offline"] = offline_clicks(self.data, self.main_registry, self.version)
            arms["offline"] = summary(clicks["offline"])
        groups = query_groups(self.data)
        for arm, arm_clicks in clicks.items():
            per_group = by_group(arm_clicks, groups)
            arms[arm]["per_query_group"] = {name: per_group[name] for _, name in GROUPS if name in per_group}
        manifest = load_version(self.main_registry, self.version).manifest
        out: dict[str, object] = {
            "static_map5": arms.get("static", {}).get("map@5"),
            "offline_map5": arms.get("offline", {}).get("map@5"),
            "offline_map5_manifest": manifest.get("metrics", {}).get("map@5"),
            "continuous_map5": arms.get("continuous", {}).get("map@5"),
            "continuous_ci95": None,
            "query_table_map5": arms.get("query_table", {}).get("map@5"),
            "swaps": sum(sw.outcome == "promoted" for sw in self.swaps),
            "searches": stats.searches,
            "clicks": len(self.data.rows),
            "unanswered": {arm: a.get("unanswered") for arm, a in arms.items() if "unanswered" in a},
            "days": len(self.data.days),
        }
        if "static" in clicks and "continuous" in clicks:
            out["continuous_vs_static"] = paired_bootstrap(clicks["static"], clicks["continuous"])
            out["continuous_ci95"] = out["continuous_vs_static"]["ci95"]  # type: ignore[index]
        if "static" in clicks and "offline" in clicks:
            out["static_vs_offline"] = paired_bootstrap(clicks["offline"], clicks["static"])
        out |= {
            "version": self.version,
            "arms": arms,
            "cycles": [sw.__dict__ for sw in self.swaps],
            "replay": {"searches": stats.searches, "unanswered": stats.unanswered, "clicks": stats.clicks,
                       "clicks_shown": stats.clicks_shown, "steps": stats.steps,
                       "seconds": round(stats.seconds, 1)},
            "settings": {"days": self.data.days, "label_days": self.args.label_days,
                         "with_unlabeled": self.args.with_unlabeled, "step_searches": self.args.step_searches,
                         "settle": self.args.settle, "spelling_refresh_s": self.args.spelling_refresh_s,
                         "search_after_result": self.args.search_after_result,
                         "max_cycle_s": self.args.max_cycle_s, "fresh_lists": self.args.fresh_lists,
                         "older_sample": self.args.older_sample, "arms": sorted(self.arms)},
            "phases_s": self.phase_s,
            "seconds": round(seconds, 1),
            "host": platform.node(),
            "cpus": len(os.sched_getaffinity(0)),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": self.args.command,
        }
        self.latency = latency
        return out


# --- arms computed offline -------------------------------------------------------------------


GROUPS = ((200, "200+"), (50, "50-199"), (10, "10-49"), (1, "1-9"), (0, "none"))


def query_groups(data: Data) -> list[str]:
    """Each test click's group: how many clicks its query (``core.text.normalize_query``) had been
    followed by before it was searched (the README's error analysis uses the same groups)."""
    from core.text import normalize_query

    split = data.split
    rows = [*split.train, *split.late, *split.test]
    clicks = sorted((r.click_time, normalize_query(r.query)) for r in rows)
    seen: dict[str, int] = {}
    out, j = [], 0
    for r in data.rows:
        while j < len(clicks) and clicks[j][0] <= r.query_time:  # type: ignore[operator]
            seen[clicks[j][1]] = seen.get(clicks[j][1], 0) + 1
            j += 1
        n = seen.get(normalize_query(r.query), 0)
        out.append(next(name for low, name in GROUPS if n >= low))
    return out



def query_table_clicks(data: Data) -> list[ServedClick]:
    """The online query table on the replayed test clicks, walked exactly as the harness walks an
    online method (evaluation.harness: one row at a time, a click observed once it happened,
    ties broken by the row's seed)."""
    split = data.split
    ranker = QueryTableRanker(online=True)
    ranker.fit(split.train, split.catalog)
    candidates = list(split.catalog.values())
    column = {c.product_id: i for i, c in enumerate(candidates)}
    pending = [(r.click_time, i, r) for i, r in enumerate(split.late)]
    heapq.heapify(pending)
    out = []
    for i, r in enumerate(split.test[:len(data.rows)]):  # the chosen days are the first rows
        while pending and pending[0][0] <= r.query_time:  # type: ignore[operator]
            ranker.observe(heapq.heappop(pending)[2])
        scores = ranker.score([r.as_query()], candidates)
        col = column.get(r.product_id or "")
        order = metrics.rank_order(scores, seed=0, first_row=i)[0]
        position = int(np.flatnonzero(order == col)[0]) + 1 if col is not None else None
        out.append(ServedClick(r.query_id, _day(r.query_time), position))  # type: ignore[arg-type]
        heapq.heappush(pending, (r.click_time, len(split.late) + i, r))
    return out


def offline_clicks(data: Data, registry: Path, version: str) -> list[ServedClick]:
    """The offline harness's walk of ``version`` (bench.parity, every difference off)."""
    from bench.parity import harness_positions

    base = Settings()
    settings = base.model_copy(update={"model": base.model.model_copy(update={"registry_dir": registry})})
    positions = harness_positions(settings, version, data.split, {r.query_id for r in data.rows})
    return [ServedClick(r.query_id, _day(r.query_time), positions.get(r.query_id, {}).get(r.product_id or ""))
            for r in data.rows]


# --- plots -----------------------------------------------------------------------------------


def plot(result: dict, latency: dict[str, list], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    arms: dict = result["arms"]  # type: ignore[assignment]
    days = result["settings"]["days"]  # type: ignore[index]
    fig, ax = plt.subplots(figsize=(10, 5))
    style = {"static": "o-", "continuous": "s-", "query_table": "^--", "offline": "x:"}
    for arm, figures in arms.items():
        per_day = figures["per_day"]
        ax.plot(range(len(days)), [per_day.get(d, {}).get("map@5", np.nan) for d in days],
                style.get(arm, "-"), label=f"{arm} ({figures['map@5']:.4f})")
    for i, cycle in enumerate(result["cycles"]):  # type: ignore[arg-type]
        x = days.index(cycle["day"]) - 0.5 if cycle["day"] in days else i + 0.5
        if cycle["outcome"] == "promoted":
            ax.axvline(x, color="tab:green", alpha=0.5, linestyle="--")
        elif cycle["outcome"] == "rejected":
            ax.axvline(x, color="tab:red", alpha=0.3, linestyle=":")
    ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45)
    ax.set_ylabel("MAP@5 (test clicks of the day)")
    ax.set_title("MAP@5 per simulated day (dashed green: a version swapped in; dotted red: rejected)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "loop_map5_per_day.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    for arm, points in latency.items():
        if points:
            ax.plot(range(len(points)), [ms for _, ms in points], ".", markersize=2, alpha=0.5, label=arm)
    points = next((p for p in latency.values() if p), [])
    for cycle in result["cycles"]:  # type: ignore[attr-defined]
        if cycle["outcome"] == "promoted":  # the first search the swapped-in version ranked
            at = next((i for i, (t, _) in enumerate(points) if t[:10] >= cycle["day"]), None)
            if at is not None:
                ax.axvline(at, color="tab:green", alpha=0.5, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("test-period search (event-time order)")
    ax.set_ylabel("publish -> result (ms)")
    ax.set_title("Publish-to-result latency through Kafka, over the replay (dashed: a swap)")
    ax.legend(markerscale=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "loop_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=0, help="replay the first N test days only (0: all)")
    parser.add_argument("--arms", type=lambda t: [a for a in t.split(",") if a], default=list(ARMS),
                        help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--label-days", type=float, default=28.0,
                        help="replay the training period's last N days through the engine (the trainer's "
                             "first labeled lists; the rest goes to the feature topics only; 0: none; "
                             "-1: the whole period)")
    parser.add_argument("--label-step", type=int, default=64, help="searches per step on the training period")
    parser.add_argument("--step-searches", type=int, default=1, help="searches per step on the test period")
    parser.add_argument("--step-s", type=float, default=1800.0)
    parser.add_argument("--no-settle", dest="settle", action="store_false",
                        help="do not wait for the feature workers between steps")
    parser.add_argument("--with-unlabeled", action="store_true",
                        help="also replay the searches whose click the dataset withholds (as searches "
                             "without clicks)")
    parser.add_argument("--search-after-result", action="store_true",
                        help="the feature workers apply each search only once its result is out (by "
                             "default they consume the query event as the scorer does, and usually "
                             "apply it before the scorer reads the shopper's features)")
    parser.add_argument("--spelling-refresh-s", type=float, default=0.001,
                        help="SHOPRANK_FEATURES_SPELLING_REFRESH_S of the scorers (default: every batch)")
    parser.add_argument("--max-cycle-s", type=float, default=3600.0,
                        help="SHOPRANK_TRAINER_MAX_CYCLE_S (default: the epoch ends a cycle, not the clock)")
    parser.add_argument("--fresh-lists", type=int, default=3000,
                        help="SHOPRANK_TRAINER_FRESH_LISTS: the newest labeled lists a cycle trains on")
    parser.add_argument("--older-sample", type=int, default=1000,
                        help="SHOPRANK_TRAINER_OLDER_SAMPLE: older lists sampled beside them")
    parser.add_argument("--version", default=None,
                        help="the version under test (default: the registry's SERVING)")
    parser.add_argument("--registry", type=Path, default=None,
                        help="the registry it is copied from (default: SHOPRANK_MODEL_REGISTRY_DIR, models/)")
    parser.add_argument("--port", type=int, default=8096, help="the engine scorer's HTTP port (static: +1)")
    parser.add_argument("--keep-topics", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--command", default="make loop-eval")
    args = parser.parse_args(argv)
    # Stopped (SIGTERM), the run still stops its services and deletes its topics.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if unknown := set(args.arms) - set(ARMS):
        parser.error(f"unknown arms {sorted(unknown)}")
    settings = Settings()
    label_days = None if args.label_days < 0 else args.label_days if "continuous" in args.arms else 0.0
    data = prepare(settings, args.days, label_days, args.with_unlabeled)
    _print(f"{len(data.days)} test days ({data.days[0]} .. {data.days[-1]}), {len(data.rows):,} test clicks, "
           f"{len(data.search_days):,} searches; arms {args.arms}")
    loop = Loop(args, data)
    result = loop.run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plots = plot(result, loop.latency, args.out.parent)
    shown = {k: v for k, v in result.items() if k not in ("arms", "cycles", "replay", "settings")}
    _print(json.dumps(shown, indent=2, default=str))
    for arm, figures in result["arms"].items():  # type: ignore[union-attr]
        per_day = " ".join(f"{d[5:]}:{v['map@5']:.3f}" for d, v in figures["per_day"].items())
        _print(f"{arm:12} MAP@5 {figures['map@5']:.4f} NDCG@10 {figures['ndcg@10']:.4f} "
               f"MRR {figures['mrr']:.4f} | {per_day}")
    _print(f"written to {args.out}; plots: {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
