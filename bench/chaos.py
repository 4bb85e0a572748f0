"""Losing any one process loses nothing, measured: ``make bench-chaos`` -> bench/results/chaos.json.

On the replicated topology (``make up-cluster``: 3 KRaft brokers, topics replicated 3x with
min.insync.replicas 2, Redis primary + replica + 3 Sentinels), an engine of its own (topics
``bench.<tag>.*``, Redis database 2 found through the Sentinels) runs as real processes: 2 feature
workers, the joiner, 2 scorers (one consumer group), the continuous trainer. Under a steady load
of shopper events (synthetic results, clicks, carts, purchases: ``--events-rate``) and searches
(Best Buy texts and shoppers with 100 candidates: ``--query-rate``, bench.loadgen), one process at
a time is killed with SIGKILL and restarted: the broker leading most partitions, the Redis
primary (Sentinel promotes the replica; the old primary rejoins as its replica), a feature
worker, a scorer, the trainer.

Then, with the load stopped and the workers caught up:

- every search got exactly one result: ``unanswered``, ``duplicate_results`` (query ids answered
  more than once: a scorer killed between publishing a result and committing its query's offset);
- the feature state equals an offline recomputation from the retained log (``shoprank rebuild``'s
  path, streams.rebuild, into another Redis database): ``lost`` (events in the log whose
  "applied" marker the online state lacks), ``double_counted`` (applications beyond the distinct
  events applied), ``shoppers_differing`` / ``products_differing`` (state not equal to the
  recomputation), ``acked_not_in_log`` (events the broker acknowledged that the log lacks);
- per fault: ``longest_gap_ms`` (the longest time without a result after the kill),
  ``recovery_s`` (from the kill to the first search after which every search of the window was
  answered within ``--slow-ms``), ``restart_s`` (the killed process back: broker ready, scorer
  ready, worker assigned its partitions, trainer serving metrics; for Redis ``failover_s``, the
  promoted replica named by Sentinel, and ``restart_s``, the old primary a replica again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
from redis.sentinel import Sentinel

from bench.engine import Services, delete_topics, engine_env
from bench.isolation import isolated_settings
from bench.loadgen import LoadGenerator, StepResult
from bench.scorer import choose_model, free_port, query_specs
from core import kafka
from core.events import Event, Query, encode
from core.processes import Service, http_ready, wait_until
from core.settings import ROOT, Settings
from core.topics import ensure_topics, route, topic_specs
from evaluation.splits import bestbuy_split
from features import keys
from features.plan import marker
from features.redis_store import RedisStore, connect
from features.sentinel import sentinel_addresses
from streams.progress import Ends, applied_up_to
from streams.rebuild import rebuild
from streams.synthetic import Shape, catalog, sessions

RESULTS = ROOT / "bench" / "results" / "chaos.json"
CLUSTER_ENV = ROOT / "var" / "cluster.env"
KAFKA_CLUSTER = str(ROOT / "infra" / "kafka-cluster.sh")
REDIS_CLUSTER = str(ROOT / "infra" / "redis-sentinel.sh")
ONLINE_DB, OFFLINE_DB = 2, 3  # on the cluster's Redis, which no other suite uses
SHAPE = Shape(users=20000, products=3000, seed=11)
FAULTS = ("broker", "redis_primary", "feature_worker", "scorer", "trainer")
# Seconds from one kill to the next, each at least what the process took to come back on this
# 2-core box shared with other work (a broker's JVM ~95 s, the old Redis primary's full resync
# ~55 s, the trainer's imports ~70 s in a trial run), plus time to see the service steady again.
WINDOW_S = {"broker": 130.0, "redis_primary": 80.0, "feature_worker": 40.0, "scorer": 60.0, "trainer": 90.0}
SETTLE_S = 10.0  # at least this long after a restart before the next kill


def _print(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_cluster_env() -> dict[str, str]:
    if not CLUSTER_ENV.exists():
        raise SystemExit(f"{CLUSTER_ENV} missing: start the replicated topology first (make up-cluster)")
    pairs = (line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


# --- the shopper-event load ----------------------------------------------------------------------


class EventLoad:
    """Synthetic shopper events (results and interactions; searches come from the load generator)
    published at a steady rate with acks=all; remembers the markers of those acknowledged."""

    def __init__(self, settings: Settings, rate: float, tag: str) -> None:
        self.settings, self.rate, self.tag = settings, rate, tag
        self.producer = kafka.producer(settings)
        self.acked: list[str] = []
        self.failed = 0
        self.sent = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="event-load", daemon=True)
        self.started = self.ended = 0.0

    def _run(self) -> None:
        # Ids of this run's own (tag): no marker another run left can make an event look applied.
        events = (e for e in sessions(SHAPE, 10**9, tag=self.tag) if not isinstance(e, Query))
        self.started = time.perf_counter()
        for i, ev in enumerate(events):
            if self.stopping.is_set():
                break
            delay = self.started + i / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self._send(ev)
        self.ended = time.perf_counter()
        self.producer.flush(120)

    def _send(self, ev: Event) -> None:
        topic, key = route(self.settings, ev)
        m = marker(ev)  # type: ignore[arg-type]

        def done(err: object, _msg: object) -> None:
            if err is None and m is not None:
                self.acked.append(m)
            elif err is not None:
                self.failed += 1

        while True:
            try:
                self.producer.produce(topic, encode(ev), key=key.encode(), on_delivery=done)
                break
            except BufferError:  # a broker outage: the local queue is full until leaders move
                self.producer.poll(0.05)
        self.sent += 1
        if self.sent % 100 == 0:
            self.producer.poll(0)

    def achieved_rate(self) -> float:
        return self.sent / max(1e-9, (self.ended or time.perf_counter()) - self.started)


# --- faults ----------------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    target: str
    killed_at: float  # perf_counter
    restart_s: float | None = None
    failover_s: float | None = None
    notes: list[str] = field(default_factory=list)


def leaders_broker(settings: Settings) -> tuple[int, int]:
    """The broker leading most partitions of the engine's busy topics, and how many it leads."""
    admin = kafka.admin_client(settings)
    count: dict[int, int] = {}
    t = settings.topics
    for topic in (t.queries, t.results, t.interactions):
        for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values():
            count[p.leader] = count.get(p.leader, 0) + 1
    broker = max(count, key=lambda b: count[b])
    return broker, count[broker]


def redis_primary(settings: Settings) -> tuple[str, int] | None:
    sentinel = Sentinel(sentinel_addresses(str(settings.redis.sentinels)), socket_timeout=1.0)
    try:
        host, port = sentinel.discover_master(settings.redis.sentinel_master)
        return str(host), int(port)
    except redis.ConnectionError:  # MasterNotFoundError: down, none promoted yet
        return None


def log_mark(svc: Service, event: str) -> int:
    """How many lines of ``svc``'s log name ``event`` (to wait for the next one)."""
    try:
        return svc.log_path.read_text(errors="replace").count(f'"{event}"')
    except FileNotFoundError:
        return 0


# --- the run -------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cluster = load_cluster_env()
        os.environ.update(cluster)  # every process of the engine, and Settings() below, see the cluster
        self.settings = isolated_settings(ONLINE_DB)
        assert self.settings.redis.sentinels, "SHOPRANK_REDIS_SENTINELS missing from var/cluster.env"
        self.work = ROOT / "var" / "bench-chaos"
        shutil.rmtree(self.work / "logs", ignore_errors=True)  # this run's logs only (replays are counted)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = choose_model(args.tiny)
        self.scorer_ports = [free_port(), free_port()]
        self.trainer_port = free_port()
        tag = uuid.uuid4().hex[:6]
        self.env = engine_env(self.settings, self.model.registry, self.scorer_ports[0], 1000) | {
            "SHOPRANK_SCORER_GROUP_ID": f"bench-chaos-scorer-{tag}",
            "SHOPRANK_STREAMS_GROUP_ID": f"bench-chaos-streams-{tag}",
            "SHOPRANK_JOINER_GROUP_ID": f"bench-chaos-joiner-{tag}",
            "SHOPRANK_TRAINER_GROUP_ID": f"bench-chaos-trainer-{tag}",
            # The trainer runs (and is killed) but does not train: a cycle would take both cores.
            "SHOPRANK_TRAINER_INTERVAL_S": "1000000", "SHOPRANK_TRAINER_MIN_NEW_LISTS": "1000000000",
            "SHOPRANK_TRAINER_METRICS_PORT": str(self.trainer_port),
            "SHOPRANK_REDIS_READ_FROM_REPLICAS": "1" if args.read_replicas else "0",
            "SHOPRANK_LOG_LEVEL": "INFO",
        }
        self.services = Services(self.work / "logs")
        self.faults: list[Fault] = []

    # services ------------------------------------------------------------------------------------

    def worker_env(self, i: int) -> dict[str, str]:
        # Static membership: a restarted worker takes its partitions back at once.
        return self.env | {"SHOPRANK_STREAMS_INSTANCE_ID": f"chaos-w{i}"}

    def scorer_env(self, i: int) -> dict[str, str]:
        return self.env | {"SHOPRANK_SCORER_HTTP_PORT": str(self.scorer_ports[i])}

    def start_worker(self, i: int) -> Service:
        return self.services.start(f"streams-{i}", self.worker_env(i), "streams")

    def start_scorer(self, i: int) -> Service:
        svc = self.services.start(f"scorer-{i}", self.scorer_env(i), "scorer")
        svc.wait_ready(f"http://127.0.0.1:{self.scorer_ports[i]}/readyz", 240)
        return svc

    def start_trainer(self) -> Service:
        svc = self.services.start("trainer", self.env, "trainer")
        url = f"http://127.0.0.1:{self.trainer_port}/metrics"
        wait_until(lambda: svc.check() or http_ready(url), 180, 0.2, "trainer serving its metrics")
        return svc

    # faults --------------------------------------------------------------------------------------

    def kill_broker(self) -> Fault:
        broker, leads = leaders_broker(self.settings)
        f = Fault("broker", f"broker {broker} (leader of {leads} partitions)", time.perf_counter())
        subprocess.run([KAFKA_CLUSTER, "kill-node", str(broker)], check=True, capture_output=True)
        time.sleep(self.args.down_s)
        out = subprocess.run([KAFKA_CLUSTER, "start-node", str(broker)], capture_output=True, text=True)
        if out.returncode != 0:
            f.notes.append(f"restart failed: {out.stderr.strip()[-300:]}")
        else:
            f.restart_s = time.perf_counter() - f.killed_at
        return f

    def kill_redis_primary(self) -> Fault:
        primary = redis_primary(self.settings)
        assert primary is not None, "no Redis primary before the fault"
        port = primary[1]
        f = Fault("redis_primary", f"redis {port} (primary)", time.perf_counter())
        subprocess.run([REDIS_CLUSTER, "kill-node", str(port)], check=True, capture_output=True)
        wait_until(lambda: (redis_primary(self.settings) or (None, port))[1] != port, 60, 0.05,
                   "Sentinel promotes the replica")
        f.failover_s = time.perf_counter() - f.killed_at
        time.sleep(self.args.down_s)
        subprocess.run([REDIS_CLUSTER, "start-node", str(port)], check=True, capture_output=True)
        old = redis.Redis(host=primary[0], port=port, socket_timeout=2)
        wait_until(lambda: old.role()[0] == b"slave"
                   and old.info("replication").get("master_link_status") == "up",
                   120, 0.1, f"redis {port} a replica again")
        f.restart_s = time.perf_counter() - f.killed_at
        return f

    def kill_worker(self) -> Fault:
        svc = self.services.procs["streams-0"]
        f = Fault("feature_worker", "feature worker 1 of 2", time.perf_counter())
        svc.kill()
        time.sleep(self.args.down_s)
        new = self.start_worker(0)
        wait_until(lambda: new.check() or log_mark(new, "partitions_assigned") > 0, 120, 0.1,
                   "the restarted worker assigned its partitions")
        f.restart_s = time.perf_counter() - f.killed_at
        return f

    def kill_scorer(self) -> Fault:
        svc = self.services.procs["scorer-0"]
        f = Fault("scorer", "scorer 1 of 2", time.perf_counter())
        svc.kill()
        time.sleep(self.args.down_s)
        self.start_scorer(0)
        f.restart_s = time.perf_counter() - f.killed_at
        return f

    def kill_trainer(self) -> Fault:
        svc = self.services.procs["trainer"]
        f = Fault("trainer", "the continuous trainer", time.perf_counter())
        svc.kill()
        time.sleep(self.args.down_s)
        self.start_trainer()
        f.restart_s = time.perf_counter() - f.killed_at
        return f

    # the run -------------------------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        a, s = self.args, self.settings
        admin = kafka.admin_client(s)
        ensure_topics(admin, topic_specs(s))
        online = connect(s.redis)
        online.flushdb()
        # On the replica too before anything starts: a failover right now (the host starved the
        # primary's answers to Sentinel in a run) would otherwise bring an earlier run's data back.
        online.execute_command("WAIT", 1, 30000)
        assert online.dbsize() == 0, "Redis database not empty after FLUSHDB"
        split = bestbuy_split(s.data_dir)
        specs = query_specs(split)
        products = [*catalog(SHAPE), *split.catalog.values()]
        _print(f"engine: topics bench.*, Redis db {ONLINE_DB} via Sentinel, model {self.model.version}"
               f"{' (tiny)' if self.model.tiny else ''}; catalog of {len(products):,} products")
        producer = kafka.producer(s)
        for p in products:
            topic, key = route(s, p)
            producer.produce(topic, encode(p), key=key.encode())
            producer.poll(0)
        assert producer.flush(60) == 0
        try:
            for i in range(2):
                self.start_worker(i)
            self.services.start("joiner", self.env, "joiner")
            for i in range(2):
                self.start_scorer(i)
            self.start_trainer()
            consumer = kafka.consumer(s, group_id=f"bench-ends-{uuid.uuid4().hex[:6]}")
            try:
                applied_up_to(online, Ends(consumer, [s.topics.catalog]).now(), s.features.shards, 300)
            finally:
                consumer.close()
            _print("engine up; load starts")
            return self._under_load(online, specs)
        finally:
            self.services.stop()
            if not a.keep_topics:
                delete_topics(s)

    def _under_load(self, online: redis.Redis, specs: list) -> dict[str, object]:
        a, s = self.args, self.settings
        gen = LoadGenerator(s, specs, self.env["SHOPRANK_SCORER_GROUP_ID"])
        gen.start()
        _print(f"warming the scorers: {gen.warm(min(a.query_rate, 20), 10, 30)} answered")
        events = EventLoad(s, a.events_rate, uuid.uuid4().hex[:6])
        windows = [a.window_s or WINDOW_S[f] for f in a.faults]
        duration = a.warmup_s + sum(windows) + a.tail_s
        step: dict[str, StepResult] = {}
        runner = threading.Thread(target=lambda: step.update(r=gen.step(a.query_rate, duration, 180)),
                                  name="queries", daemon=True)
        failovers = Failovers(s)
        loads: list[float] = []  # the host's 1-minute load average: what else the 2 cores ran
        sampler = threading.Thread(target=_sample_load, args=(loads, events.stopping), daemon=True)
        t0 = time.perf_counter()
        sampler.start()
        events.thread.start()
        runner.start()
        time.sleep(a.warmup_s)
        kill: dict[str, Callable[[], Fault]] = {
            "broker": self.kill_broker, "redis_primary": self.kill_redis_primary,
            "feature_worker": self.kill_worker, "scorer": self.kill_scorer, "trainer": self.kill_trainer}
        slot = t0 + a.warmup_s
        for i, name in enumerate(a.faults):
            time.sleep(max(0.0, slot - time.perf_counter()))
            if time.perf_counter() > t0 + duration - a.tail_s:
                _print(f"  {name}: past the load's end, not run (a restart took longer than its window)")
                break
            _print(f"fault {i + 1}/{len(a.faults)}: {name}")
            fault = kill[name]()
            self.faults.append(fault)
            _print(f"  {fault.target}: back after {fault.restart_s and round(fault.restart_s, 1)} s"
                   + (f", failover {fault.failover_s:.1f} s" if fault.failover_s else ""))
            dead = self.services.dead()
            if dead:
                _print(f"  not running: {dead}")
            slot = max(slot + windows[i], time.perf_counter() + SETTLE_S)
        _print("faults done; steady tail")
        time.sleep(max(0.0, t0 + duration - time.perf_counter()))
        events.stopping.set()
        events.thread.join(180)
        runner.join(400)
        result = step["r"]
        sent = gen.last_sent
        lat = gen.latencies(sent)
        deliveries = {q: gen.deliveries[q] for q in sent}
        gen.close()
        _print(f"load done: {result.sent} searches, {result.unanswered} unanswered; {events.sent:,} events "
               f"at {events.achieved_rate():.0f}/s")

        # Caught up, then stopped: nothing changes Redis during the comparison.
        consumer = kafka.consumer(s, group_id=f"bench-ends-{uuid.uuid4().hex[:6]}")
        t = s.topics
        caught_up = True
        try:
            inputs = [t.catalog, t.queries, t.results, t.interactions]
            applied_up_to(online, Ends(consumer, inputs).now(), s.features.shards, 300)
        except TimeoutError as exc:
            caught_up = False
            _print(f"feature workers did not catch up: {exc}")
        finally:
            consumer.close()
        dead = self.services.dead()
        self.services.stop()
        _print("comparing with the offline recomputation (streams.rebuild into db "
               f"{OFFLINE_DB})")
        state = compare_with_rebuild(s, online, events.acked)
        self.loads = loads
        failovers.stop()
        planned = sum(1 for f in self.faults if f.name == "redis_primary")
        self.failovers = {"sentinel_failovers": len(failovers.at),
                          "unplanned_failovers": len(failovers.at) - planned,
                          "worker_replays_from_redis": sum(log_mark(p, "replaying_from_redis")
                                                           for n, p in self.services.procs.items()
                                                           if n.startswith("streams"))}
        return self._report(result, lat, deliveries, events, state, caught_up, dead)

    def _report(self, result: StepResult, lat: list[tuple[float, float | None]], deliveries: dict[str, int],
                events: EventLoad, state: dict[str, object], caught_up: bool, dead: list[str]
                ) -> dict[str, object]:
        a = self.args
        duplicates = sum(1 for n in deliveries.values() if n > 1)
        ends = [f.killed_at for f in self.faults[1:]] + [math.inf]
        # Steady state: the searches sent before the first kill (after the warm-up's first 5 s).
        first = self.faults[0].killed_at if self.faults else math.inf
        begin = min((t for t, _ in lat), default=0.0) + 5.0
        steady = sorted(ms for t, ms in lat if ms is not None and begin <= t < first)
        steady_p99 = steady[int(0.99 * (len(steady) - 1))] if steady else None
        slow_ms = max(a.slow_ms, 3 * steady_p99) if steady_p99 else a.slow_ms
        per_fault = {}
        for f, end in zip(self.faults, ends, strict=True):
            per_fault[f.name] = {
                "target": f.target,
                **fault_figures(lat, f.killed_at, end, slow_ms),
                "restart_s": round(f.restart_s, 2) if f.restart_s is not None else None,
                **({"failover_s": round(f.failover_s, 2)} if f.failover_s is not None else {}),
                **({"notes": f.notes} if f.notes else {}),
            }
        return {
            "unanswered": result.unanswered,
            "duplicate_results": duplicates,
            "extra_results": sum(n - 1 for n in deliveries.values() if n > 1),
            **state,
            **self.failovers,
            "faults": per_fault,
            "searches": result.sent,
            "query_rate": a.query_rate,
            "steady_p99_ms": round(steady_p99, 1) if steady_p99 else None,
            "slow_ms": round(slow_ms, 1),
            "query_p50_ms": round(result.p50_ms, 1) if result.p50_ms else None,
            "query_p99_ms": round(result.p99_ms, 1) if result.p99_ms else None,
            "events_rate_offered": a.events_rate,
            "events_rate_achieved": round(events.achieved_rate(), 1),
            "events_published": events.sent,
            "events_failed": events.failed,
            "features_caught_up": caught_up,
            "processes_dead_at_end": dead,
            "topology": {"brokers": 3, "replication_factor": self.settings.topics.replication_factor,
                         "min_insync_replicas": self.settings.topics.min_insync_replicas,
                         "redis": "primary + 1 replica + 3 Sentinels",
                         "scorers_read_replicas": bool(a.read_replicas),
                         "feature_workers": 2, "scorers": 2, "joiner": 1, "trainer": "1 (not training)"},
            "model": {"version": self.model.version, "tiny": self.model.tiny},
            "schedule": {"warmup_s": a.warmup_s, "down_s": a.down_s, "tail_s": a.tail_s, "settle_s": SETTLE_S,
                         "windows_s": {f: a.window_s or WINDOW_S[f] for f in a.faults}},
            "host": f"vm, {os.cpu_count()} cores ({platform.node()}); see host_load_avg_1m",
            "host_load_avg_1m": {"min": min(self.loads, default=None), "max": max(self.loads, default=None),
                                 "mean": round(sum(self.loads) / len(self.loads), 1) if self.loads else None},
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": a.command,
            "note": a.note,
        }


class Failovers:
    """Every ``+switch-master`` a Sentinel announces (pub/sub) while it runs: the planned ones and
    any the host's load caused (a primary starved of CPU misses Sentinel's pings)."""

    def __init__(self, settings: Settings) -> None:
        host, port = sentinel_addresses(str(settings.redis.sentinels))[0]
        self.at: list[float] = []
        self.pubsub = redis.Redis(host=host, port=port).pubsub()
        self.pubsub.subscribe(**{"+switch-master": lambda _msg: self.at.append(time.perf_counter())})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.2, daemon=True)

    def stop(self) -> None:
        self.thread.stop()


def _sample_load(into: list[float], stop: threading.Event) -> None:
    while not stop.wait(5.0):
        into.append(round(os.getloadavg()[0], 1))


def fault_figures(lat: list[tuple[float, float | None]], start: float, end: float, slow_ms: float
                  ) -> dict[str, object]:
    """Within [start, end): the longest time without a result, and when service recovered."""
    received = sorted(t + ms / 1000 for t, ms in lat if ms is not None and start <= t + ms / 1000 < end)
    window = [(t, ms) for t, ms in lat if start <= t < end]
    gaps = [b - a for a, b in zip([start, *received], received, strict=False)]
    longest = max(gaps, default=None)
    slow = [t for t, ms in window if ms is None or ms > slow_ms]
    recovered = (max(slow) - start) if slow else 0.0
    unanswered = sum(1 for _, ms in window if ms is None)
    return {"longest_gap_ms": round(longest * 1000, 1) if longest is not None else None,
            "recovery_s": round(recovered, 2), "searches": len(window), "slow": len(slow),
            "unanswered": unanswered}


def markers(client: redis.Redis) -> set[bytes]:
    out: set[bytes] = set()
    for k in client.scan_iter(match=keys.APPLIED + "*", count=1000):
        out.update(client.hkeys(k))
    return out


def compare_with_rebuild(settings: Settings, online: redis.Redis, acked: list[str]) -> dict[str, object]:
    """The online state against streams.rebuild's recomputation from the log (another database)."""
    url = settings.redis.url.rsplit("/", 1)[0] + f"/{OFFLINE_DB}"
    offline_settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})
    offline = connect(offline_settings.redis)
    offline.flushdb()
    started = time.perf_counter()
    report = rebuild(offline_settings, progress=False)
    rebuild_s = time.perf_counter() - started
    on_m, off_m = markers(online), markers(offline)
    applied_online = int(online.hget(keys.STATS, keys.STATS_APPLIED) or 0)
    on_store = RedisStore(online, settings.features, settings.streams)
    off_store = RedisStore(offline, settings.features, settings.streams)
    on_users, off_users = on_store.users(), off_store.users()
    differing = [u for u in set(on_users) | set(off_users) if on_users.get(u) != off_users.get(u)]
    pids = {p.decode().removeprefix(keys.ITEM) for p in offline.scan_iter(match=keys.ITEM + "*", count=5000)}
    products_differing = [p for p in pids if not all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        for x, y in zip(on_store.item(p), off_store.item(p), strict=True))]
    acked_set = {m.encode() for m in acked}
    out = {
        "lost": len(off_m - on_m),
        "double_counted": applied_online - len(on_m),
        "applied_not_in_log": len(on_m - off_m),
        "acked_not_in_log": len(acked_set - off_m),
        "shoppers_differing": len(differing),
        "products_differing": len(products_differing),
        "events_in_log": report.events,
        "events_applied_online": applied_online,
        "shoppers": len(off_users),
        "products_compared": len(pids),
        "rebuild_s": round(rebuild_s, 1),
    }
    offline.flushdb()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-rate", type=float, default=2000.0, help="shopper events per second")
    parser.add_argument("--query-rate", type=float, default=50.0, help="searches per second")
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--window-s", type=float, default=0.0,
                        help="seconds from one kill to the next (0: per fault, WINDOW_S)")
    parser.add_argument("--down-s", type=float, default=5.0, help="how long a killed process stays down")
    parser.add_argument("--tail-s", type=float, default=20.0)
    parser.add_argument("--slow-ms", type=float, default=1000.0,
                        help="a search answered later than this (or 3x the steady p99) is slow")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the serving version")
    parser.add_argument("--read-replicas", action="store_true", help="scorers read features from the replica")
    parser.add_argument("--keep-topics", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--command", default="make bench-chaos")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    chaos = Chaos(args)
    result = chaos.run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    _print(json.dumps(result, indent=2, default=str))
    _print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
