"""SIMULATION through the live engine: simulated shoppers search, the running engine ranks, their
clicks, add-to-carts and purchases on what it served go back to Kafka, the feature workers update
Redis, and (``cycle_days``) the continuous trainer learns from the joiner's labeled lists.

A fresh engine of its own (bench.engine): topics ``bench.<tag>.*`` (bench.isolation), Redis db 3
(flushed), registries under ``var/personal/sim``. Before the first simulated day, the catalog and
Best Buy's training period (its real searches and clicks) are applied to Redis through the feature
topics, so the engine starts where the real log ended; the simulation's days follow.

Arms, every one ranking the same simulated searches (whole catalog):

- ``personal``: the personalized version (shopper features on), served by the engine's scorer;
  its lists are the ones the shoppers answer (and the joiner labels, and the trainer learns from);
- ``nonpersonal``: by default the same engine's model with the shopper hidden: every search is
  also sent, as an unknown shopper's (no history, cold-start shopper features, no location or
  device: where and on what a shopper searches is personal context too), to a second
  scorer that reads searches and writes results on topics of its own (the feature workers never
  see them), shares the engine's registry and model updates (it swaps when the engine swaps) and
  reads the same Redis: a shadow nobody clicks on. With ``nonpersonal_version``: that version
  (e.g. trained without shopper features) instead, never swapped;
- ``oracle``: the shopper's base relevance times the shopper's true preference (no noise);
  ``population``: base relevance alone (computed here, not served).

Figures: NDCG@10 of each against the simulator's true attractiveness, per search, overall and
per simulated day; headline ``gain_share`` = (personal - nonpersonal) / (oracle - nonpersonal).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis
import structlog
from confluent_kafka import TopicPartition

from bench import engine
from bench.isolation import isolated_settings
from core import kafka
from core.events import (
    RESULTS,
    AddToCart,
    Click,
    InvalidEvent,
    Purchase,
    Query,
    QueryContext,
    ServedFeatures,
    encode,
)
from core.layout import product_tower
from core.processes import wait_until
from core.registry import load_version, serving_version, set_serving
from core.settings import ROOT, Settings
from core.topics import ensure_topics, route, topic_specs
from features.embeddings import ProductEmbeddings
from sim import TRAINER_EPOCHS
from sim.ablation import Served
from sim.world import Interaction, SimSearch, World
from streams.progress import Ends, applied_up_to, joiner_reached

log = structlog.get_logger(__name__)

WORK = ROOT / "var" / "personal" / "sim"
SIM_DB = 3


class Lists(threading.Thread):
    """Follows a results topic from its end; keeps each awaited search's served product ids (and,
    ``keep_features``, the features they were served on: sim.ablation replays them)."""

    def __init__(self, settings: Settings, topic: str, keep_features: bool = False) -> None:
        super().__init__(name=f"sim-lists-{topic}", daemon=True)
        self._consumer = kafka.consumer(
            settings, group_id=f"sim-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 5}
        )
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign(
            [
                TopicPartition(
                    topic, p, self._consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
                )
                for p in partitions
            ]
        )
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self.got: dict[str, tuple[list[str], str]] = {}  # query id -> (products, model version)
        self.keep_features = keep_features
        self.features: dict[str, ServedFeatures] = {}  # query id -> rows in ranked order

    def wait(self, query_ids: Sequence[str], timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [q for q in query_ids if q not in self.got]
                if not missing or time.monotonic() > deadline:
                    return missing
                self._cond.wait(0.2)

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                for m in self._consumer.consume(500, timeout=0.005):
                    if m.error() is not None:
                        continue
                    try:
                        r = RESULTS.decode(m.value() or b"")
                    except InvalidEvent:
                        continue
                    ranked = [p.product_id for p in sorted(r.products, key=lambda p: p.position)]
                    with self._cond:
                        if self.keep_features and r.features is not None:
                            self.features[r.query_id] = r.features
                        self.got[r.query_id] = (ranked, r.model_version)
                        self._cond.notify_all()
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()


@dataclass
class LiveConfig:
    registry: Path  # where the trained versions are
    personal_version: str
    nonpersonal_version: str | None = None  # None: the engine's own model, shopper hidden
    step_searches: int = 8
    cycle_days: int = 0  # a trainer cycle every N simulated days (0: the versions never change)
    port: int = 8196
    keep_topics: bool = False
    # The simulation's labeled lists are few: a cycle starts with this many new ones (the product's
    # default, 2,000, would never be reached by a run of a few thousand searches) and holds out
    # this many for the gate.
    trainer_min_lists: int = 300
    trainer_holdout: int = 150
    trainer_epochs: int = TRAINER_EPOCHS
    work: Path = WORK  # registries and logs of the run (replaced)
    redis_db: int = SIM_DB


def interaction_events(search: SimSearch, user_id: str, actions: Sequence[Interaction]) -> list[Any]:
    out: list[Any] = []
    for i, a in enumerate(actions):
        common = {
            "event_id": f"{search.query_id}-{a.kind}-{i}",
            "user_id": user_id,
            "session_id": search.session_id,
            "product_id": a.product_id,
            "query_id": search.query_id,
            "position": a.position,
            "timestamp": a.time,
        }
        if a.kind == "click":
            out.append(Click(**common, price=a.price))
        elif a.kind == "add_to_cart":
            out.append(AddToCart(**common, price=a.price))
        elif a.kind == "purchase" and a.price:
            out.append(Purchase(**common, price=a.price, order_id=f"o-{search.query_id}-{i}"))
    return out


class LiveSim:
    """One simulation run through an engine of its own (see the module docstring)."""

    def __init__(self, world: World, searches: Sequence[SimSearch], config: LiveConfig) -> None:
        self.world, self.searches, self.config = world, list(searches), config
        self.work = config.work
        shutil.rmtree(self.work, ignore_errors=True)
        # No version for the nonpersonal arm: the engine's own model, its shopper hidden.
        self.anonymous = config.nonpersonal_version is None
        self.registries = {"personal": self.work / "registry"}
        arms = [("personal", config.personal_version)]
        if config.nonpersonal_version is not None:
            self.registries["nonpersonal"] = self.work / "registry-np"
            arms.append(("nonpersonal", config.nonpersonal_version))
        for arm, version in arms:
            reg = self.registries[arm]
            reg.mkdir(parents=True)
            shutil.copytree(config.registry / version, reg / version)
            set_serving(reg, version, reason=f"SIMULATION: the {arm} arm", by="sim")
        s = isolated_settings(config.redis_db)
        self.settings = s.model_copy(
            update={"model": s.model.model_copy(update={"registry_dir": self.registries["personal"]})}
        )
        t = self.settings.topics
        # Anonymous: the second scorer reads searches of its own (the feature workers never see
        # them) and swaps with the engine's scorer (same registry, same model updates).
        np_topics = (
            {"results": f"{t.results}-np", "queries": f"{t.queries}-anon"}
            if self.anonymous
            else {"results": f"{t.results}-np", "model_updates": f"{t.model_updates}-np"}
        )
        self.np_settings = self.settings.model_copy(
            update={
                "topics": t.model_copy(update=np_topics),
                "model": s.model.model_copy(
                    update={"registry_dir": self.registries.get("nonpersonal", self.registries["personal"])}
                ),
            }
        )
        self.np_extra = [getattr(self.np_settings.topics, k) for k in np_topics]
        n = len(world.product_ids)
        common = {
            "SHOPRANK_FEATURES_SPELLING_REFRESH_S": "0.001",
            "SHOPRANK_SCORER_RETRIEVE_K": str(n),
            "SHOPRANK_TRAINER_MAX_CYCLE_S": "3600",
            "SHOPRANK_TRAINER_MIN_NEW_LISTS": str(config.trainer_min_lists),
            "SHOPRANK_TRAINER_HOLDOUT_LISTS": str(config.trainer_holdout),
            "SHOPRANK_TRAINER_EPOCHS": str(config.trainer_epochs),
        }
        self.env = engine.engine_env(self.settings, self.registries["personal"], config.port, n, **common)
        self.np_env = engine.engine_env(
            self.np_settings, self.np_settings.model.registry_dir, config.port + 1, n, **common
        )
        self.client = redis.Redis.from_url(self.settings.redis.url)
        self.served: dict[str, dict[str, list[str]]] = {"personal": {}, "nonpersonal": {}}
        self.actions: dict[str, list[Interaction]] = {}
        self.versions: dict[str, str] = {}
        self.replays: dict[str, Served] = {}  # the personal arm's answers as served (sim.ablation)
        self.cycles: list[dict[str, Any]] = []
        self.phase_s: dict[str, float] = {}

    def run(self, history: Sequence[Any], catalog: Sequence[Any]) -> None:
        s = self.settings
        admin = kafka.admin_client(s)
        ensure_topics(admin, topic_specs(s))
        ensure_topics(admin, [t for t in topic_specs(self.np_settings) if t.name in self.np_extra])
        self.client.flushdb()
        services = engine.Services(self.work / "logs")
        try:
            self._run(services, history, catalog)
        finally:
            services.stop()
            if not self.config.keep_topics:
                engine.delete_topics(s, self.np_extra)

    def _run(self, services: engine.Services, history: Sequence[Any], catalog: Sequence[Any]) -> None:
        s = self.settings
        started = time.monotonic()
        services.start("streams", self.env)
        services.start("embedder", self.env)
        if self.config.cycle_days:
            services.start("joiner", self.env)
        engine.publish_events(s, catalog)
        for arm, reg in self.registries.items():
            tower = product_tower(load_version(reg, serving_version(reg) or "").manifest)
            if tower is not None:
                embedded = ProductEmbeddings(self.client, tower.id)
                wait_until(
                    lambda e=embedded: e.count() >= len(self.world.product_ids) or bool(services.dead()),
                    300,
                    0.5,
                    f"the catalog embedded for the {arm} arm",
                )
        topics = [s.topics.catalog, s.topics.queries, s.topics.interactions]
        n = engine.publish_events(s, history)
        engine.wait_features(s, self.client, topics, 900)
        services.check()
        self.phase_s["history"] = round(time.monotonic() - started, 1)
        log.info("sim_history_applied", events=n, seconds=self.phase_s["history"])
        first = self.searches[0].time - timedelta(seconds=1)
        services.start("scorer", self.env)
        services.start("scorer-np", self.np_env, command="scorer")
        for st in (s, self.np_settings):
            engine.ask(st, "warm up", self.world.product_ids[:1], first, timeout_s=180, retries=18)
        mark = time.monotonic()
        lists = {
            "personal": Lists(s, s.topics.results, keep_features=True),
            "nonpersonal": Lists(s, self.np_settings.topics.results),
        }
        for t in lists.values():
            t.start()
        producer = kafka.producer(s, **{"linger.ms": 1})
        ends_consumer = kafka.consumer(s, group_id=f"sim-ends-{uuid.uuid4().hex[:6]}")
        watched = Ends(ends_consumer, [s.topics.queries, s.topics.interactions, s.topics.results])
        try:
            day = self.searches[0].day
            step = self.config.step_searches
            i = 0
            while i < len(self.searches):
                batch = [x for x in self.searches[i : i + step] if x.day == self.searches[i].day]
                if batch[0].day != day:
                    if self.config.cycle_days and batch[0].day % self.config.cycle_days == 0:
                        self._cycle(batch[0], ends_consumer, services)
                    day = batch[0].day
                self._step(batch, lists, producer)
                applied_up_to(self.client, watched.now(), self.settings.features.shards, timeout_s=300)
                i += len(batch)
                if i % 400 < len(batch):
                    services.check()
                    log.info(
                        "sim_progress",
                        searches=i,
                        of=len(self.searches),
                        seconds=round(time.monotonic() - mark, 1),
                    )
        finally:
            for t in lists.values():
                t.stop()
            ends_consumer.close()
        self.phase_s["simulation"] = round(time.monotonic() - mark, 1)
        services.check()

    def _step(self, batch: Sequence[SimSearch], lists: dict[str, Lists], producer: Any) -> None:
        s = self.settings
        queries = []
        for x in batch:
            u = self.world.shoppers[x.shopper]
            queries.append(
                Query(
                    query_id=x.query_id,
                    user_id=u.user_id,
                    session_id=x.session_id,
                    text=x.text,
                    context=QueryContext(location=u.location, device=u.device),
                    timestamp=x.time,
                )
            )
        kafka.send_acked(producer, s.topics.queries, [(q.user_id.encode(), encode(q), None) for q in queries])
        if self.anonymous:  # the same searches by a shopper nobody knows, from nowhere in particular
            hidden = [
                msgspec.structs.replace(
                    q,
                    query_id=f"{q.query_id}-anon",
                    user_id=f"anon-{q.query_id}",
                    session_id=f"anon-{q.query_id}",
                    context=QueryContext(),
                )
                for q in queries
            ]
            kafka.send_acked(
                producer,
                self.np_settings.topics.queries,
                [(q.user_id.encode(), encode(q), None) for q in hidden],
            )
        ids = [q.query_id for q in queries]
        for arm, t in lists.items():
            wanted = [f"{q}-anon" for q in ids] if arm == "nonpersonal" and self.anonymous else ids
            if missing := t.wait(wanted, 120):
                raise TimeoutError(f"the {arm} scorer did not answer {len(missing)} searches in 120 s")
        events = []
        for x in batch:
            ranked, version = lists["personal"].got[x.query_id]
            self.served["personal"][x.query_id] = ranked
            if (served := lists["personal"].features.get(x.query_id)) is not None:
                self.replays[x.query_id] = Served(ranked, version, served)
            hidden_id = f"{x.query_id}-anon" if self.anonymous else x.query_id
            self.served["nonpersonal"][x.query_id] = lists["nonpersonal"].got[hidden_id][0]
            self.versions[x.query_id] = version
            acts = self.world.respond(x, ranked, seed=zlib.crc32(x.query_id.encode()))
            self.actions[x.query_id] = acts
            events += interaction_events(x, self.world.shoppers[x.shopper].user_id, acts)
        if events:
            msgs = []
            for e in events:
                _topic, key = route(s, e)
                msgs.append((key.encode(), encode(e), None))
            kafka.send_acked(producer, s.topics.interactions, msgs)

    def _cycle(self, first: SimSearch, consumer: Any, services: engine.Services) -> None:
        """Event time to the new day's start, the joiner's lists out, one trainer cycle, the swap."""
        s = self.settings
        started = time.monotonic()
        boundary = first.time.replace(hour=0, minute=0, second=0, microsecond=0)
        engine.advance_event_time(s, boundary)
        ends = engine.topic_ends(consumer, [s.topics.results, s.topics.interactions])
        wait_until(
            lambda: joiner_reached(self.client, ends, s.topics.partitions), 120, 0.05, "joiner caught up"
        )
        time.sleep(s.joiner.idle_s + 1.5)  # both inputs idle: the joiner's watermark moves on
        wait_until(
            lambda: joiner_reached(self.client, ends, s.topics.partitions), 120, 0.05, "joiner published"
        )
        reg = self.registries["personal"]
        before = serving_version(reg)
        out = subprocess.run(
            [sys.executable, "-m", "shoprank", "trainer", "--once"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        after = serving_version(reg)
        outcome = {0: "promoted", 3: "rejected", 4: "nothing", 5: "lease_held"}.get(out.returncode, "failed")
        lines = (out.stdout.strip() or out.stderr.strip()).splitlines()
        if after != before and after is not None:
            engine.wait_serving(self.config.port, after, 180)
        self.cycles.append(
            {
                "before_day": first.day,
                "outcome": outcome,
                "version": after,
                "reason": (lines[-1] if lines else "")[:300],
                "seconds": round(time.monotonic() - started, 1),
                "lists": engine.labeled_count(s),
            }
        )
        (self.work / "logs" / "trainer.log").open("a").write(
            f"--- cycle before day {first.day}\n{out.stdout}{out.stderr}"
        )
        log.info("sim_cycle", **self.cycles[-1])
        services.check()


def figures(
    world: World,
    searches: Sequence[SimSearch],
    served: dict[str, dict[str, list[str]]],
    seed: int = 0,
    actions: Mapping[str, Sequence[Interaction]] | None = None,
) -> dict[str, Any]:
    """NDCG@10 against true attractiveness per arm (served and computed), overall and per day,
    the gain share, a paired bootstrap of personal - nonpersonal, and the oracle's ablation per
    preference dimension (the oracle knowing only that dimension / all but it). With the
    ``actions`` the personal arm's lists drew, also the learner of :mod:`sim.bound` on the same
    data, and its gain share: how much of the oracle's gain that data gives a ranker that knows
    the simulator's form."""
    from sim.bound import learner_ndcg
    from sim.world import DIMENSIONS, ndcg_at, ranking

    names = [
        "personal",
        "nonpersonal",
        "oracle",
        "population",
        *[f"oracle_only_{d}" for d in DIMENSIONS],
        *[f"oracle_without_{d}" for d in DIMENSIONS],
    ]
    values = {n: np.zeros(len(searches)) for n in names}
    for i, x in enumerate(searches):
        gains = world.attractiveness(x.shopper, x.key)
        for arm in ("personal", "nonpersonal"):
            cols = [world.column[p] for p in served[arm][x.query_id] if p in world.column]
            values[arm][i] = ndcg_at(cols, gains)
        values["oracle"][i] = ndcg_at(ranking(world.oracle(x.shopper, x.key), seed=i), gains)
        values["population"][i] = ndcg_at(ranking(world.population(x.key), seed=i), gains)
        for d in DIMENSIONS:
            values[f"oracle_only_{d}"][i] = ndcg_at(
                ranking(world.oracle(x.shopper, x.key, only=[d]), seed=i), gains
            )
            rest = [e for e in DIMENSIONS if e != d]
            values[f"oracle_without_{d}"][i] = ndcg_at(
                ranking(world.oracle(x.shopper, x.key, only=rest), seed=i), gains
            )
    if actions is not None:
        values["learner"] = learner_ndcg(world, searches, served["personal"], actions)
    mean = {n: round(float(v.mean()), 4) for n, v in values.items()}
    days = sorted({x.day for x in searches})
    per_day = {
        str(d): {
            n: round(float(values[n][[x.day == d for x in searches]].mean()), 4)
            for n in ("personal", "nonpersonal", "oracle", "population")
        }
        for d in days
    }
    rng = np.random.default_rng(seed)
    diff = values["personal"] - values["nonpersonal"]
    picks = rng.integers(0, len(diff), size=(2000, len(diff)))
    lo, hi = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    denom = mean["oracle"] - mean["nonpersonal"]
    denom_pop = mean["oracle"] - mean["population"]
    learns = "learner" in mean and denom > 0
    return {
        "ndcg@10": mean,
        "per_day": per_day,
        "personal_minus_nonpersonal": {
            "diff": round(float(diff.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "searches": len(diff),
        },
        "gain_share": round((mean["personal"] - mean["nonpersonal"]) / denom, 4) if denom > 0 else None,
        **({"learner_gain_share": round((mean["learner"] - mean["nonpersonal"]) / denom, 4)}
           if learns else {}),
        "gain_share_vs_population": round((mean["personal"] - mean["population"]) / denom_pop, 4)
        if denom_pop > 0
        else None,
        "ablation": {
            d: {
                "oracle_only": mean[f"oracle_only_{d}"],
                "oracle_without": mean[f"oracle_without_{d}"],
                "share_of_oracle_gain_lost_without": round(
                    (mean["oracle"] - mean[f"oracle_without_{d}"]) / denom_pop, 4
                )
                if denom_pop > 0
                else None,
            }
            for d in DIMENSIONS
        },
    }


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
