"""Feature-pipeline benchmark: ``make bench-streams`` -> bench/results/streams.json.

All figures are measured in one run, on this machine, against the local Kafka and Redis:

- ``raw_broker_eps``: a consume-only librdkafka loop over the same events (the broker's ceiling);
- ``raw_redis_ops``: pipelined SETs measured by redis-benchmark (Redis's ceiling);
- ``worker_eps``: one ``shoprank streams`` worker (``--engine``, default the settings' engine)
  draining a backlog of the events (10%-90%), and in that window the CPU per event of the
  worker process and of Redis (``INFO cpu``; on the cluster summed over the primaries, the
  replicas apart): figures that hold across hosts better than rates;
- ``freshness_p50_ms`` / ``freshness_p99_ms``: publish -> readable in Redis, for probe clicks
  of new shoppers inside a steady 5,000 events/s stream;
- ``bytes_per_user``: MEMORY USAGE of a shopper's key, mean over a sample, 100,000 shoppers;
- ``faust_noop_eps`` (``--noop``): faust agents that only count, faust's own ceiling here;
- ``cluster_*`` (``--topology cluster`` or ``both``, the default): the same worker, freshness and
  memory figures with the feature state in owner shards on the Redis Cluster of
  ``make up-redis-cluster`` (3 primaries, a replica each), and ``raw_cluster_ops``, pipelined SETs
  over its primaries (redis-benchmark --cluster).

Topics are fresh (``bench.<tag>.*``, deleted afterwards); Redis DB 14 and the Redis Cluster
(the tests' too: run it alone) are flushed first.

On the 2-core reference host the cluster's six servers share the cores with Kafka and the
worker: the cluster figures say what sharding costs per event (a commit per shard, each
shard's share of every product written and read), not how far more primaries scale out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import TopicPartition
from redis.cluster import RedisCluster

from bench.isolation import isolated_settings
from core import kafka
from core.events import Click, Event, Query, encode
from core.logs import configure_logging
from core.processes import process_cpu_s
from core.settings import Settings
from core.topics import ensure_topics, route, topic_specs
from features import keys
from features.keys import Shards
from features.plan import Record
from features.read import Request, read_batch
from features.redis_store import Client, RedisStore, connect, stats
from streams.synthetic import START, Shape, catalog, sessions
from streams.testing import Worker, environment, publish, wait_until

RESULTS = Path(__file__).resolve().parent / "results" / "streams.json"
BENCH_DB = 14


def bench_settings() -> Settings:
    return isolated_settings(BENCH_DB)


def raw_broker_eps(settings: Settings, n: int) -> float:
    t = settings.topics
    consumer = kafka.consumer(settings, group_id=f"bench-raw-{uuid.uuid4().hex[:6]}")
    parts = [TopicPartition(topic, p, 0) for topic in (t.queries, t.results, t.interactions)
             for p in range(t.partitions)]
    consumer.assign(parts)
    seen, started = 0, None
    while seen < n:
        msgs = consumer.consume(10000, timeout=1.0)
        if msgs and started is None:
            started = time.perf_counter()
        seen += sum(1 for m in msgs if not m.error())
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / elapsed


def raw_redis_ops(settings: Settings) -> float:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark is missing (it comes with Debian's redis-tools)")
    host, port = re.match(r"rediss?://([^:/]+):(\d+)", settings.redis.url).groups()  # type: ignore[union-attr]
    out = subprocess.run([exe, "-h", host, "-p", port, "--dbnum", str(BENCH_DB), "-t", "set", "-P", "16",
                          "-n", "1000000", "-r", "100000", "-q", "--csv"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    row = next(line for line in out.splitlines() if line.startswith('"SET"'))
    return float(row.split(",")[1].strip('"'))


def redis_cpu_s(client: Client) -> tuple[float, float]:
    """CPU seconds (user + sys) Redis has used: (primaries, replicas) summed over a cluster's nodes,
    (the server, 0) for one Redis."""
    if not isinstance(client, RedisCluster):
        info = client.info("cpu")
        return info["used_cpu_user"] + info["used_cpu_sys"], 0.0
    used = {True: 0.0, False: 0.0}
    for node in client.get_nodes():
        info = client.info("cpu", target_nodes=node)
        used[node.server_type == "primary"] += info["used_cpu_user"] + info["used_cpu_sys"]
    return used[True], used[False]


def worker_eps(client: Client, shards: Shards, total: int, worker: Worker) -> tuple[float, dict[str, float]]:
    """The worker's rate between 10% and 90% of the backlog, and the CPU spent in that window per
    event: the worker process's, Redis's (primaries; replicas apart), in microseconds."""
    marks: dict[int, tuple[float, float, float, float]] = {}
    lo, hi = int(total * 0.1), int(total * 0.9)
    deadline = time.monotonic() + 900
    while len(marks) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"backlog not drained in 900 s:\n{worker.log_tail()}")
        if not worker.alive():
            raise RuntimeError("worker died:\n" + worker.log_tail())
        done = stats(client, shards).get(keys.STATS_APPLIED, 0)
        now = time.perf_counter()
        for mark in (lo, hi):
            if done >= mark and mark not in marks:
                marks[mark] = (now, process_cpu_s(worker.pid), *redis_cpu_s(client))
        time.sleep(0.02)
    (t0, w0, p0, r0), (t1, w1, p1, r1) = marks[lo], marks[hi]
    per_event = 1e6 / (hi - lo)
    return (hi - lo) / (t1 - t0), {"worker_cpu_us_per_event": round((w1 - w0) * per_event, 1),
                                   "redis_cpu_us_per_event": round((p1 - p0) * per_event, 1),
                                   "replicas_cpu_us_per_event": round((r1 - r0) * per_event, 1)}


def faust_noop_eps(settings: Settings, client: redis.Redis, total: int) -> float:
    """faust's own ceiling here: the same consumer settings, an agent that only counts."""
    env = environment(settings, group_id=f"bench-noop-{uuid.uuid4().hex[:6]}")
    proc = subprocess.Popen([sys.executable, "-m", "bench.streams", "--noop-worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        marks: dict[int, float] = {}
        lo, hi = int(total * 0.1), int(total * 0.9)
        deadline = time.monotonic() + 600
        while len(marks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            done, now = int(client.get("bench:noop") or 0), time.perf_counter()
            for mark in (lo, hi):
                if done >= mark and mark not in marks:
                    marks[mark] = now
            time.sleep(0.02)
        if len(marks) < 2:
            raise RuntimeError("the no-op faust worker did not drain the backlog")
        return (hi - lo) / (marks[hi] - marks[lo])
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        client.delete("bench:noop")


def noop_worker() -> int:
    """Child process of :func:`faust_noop_eps`: a faust app like the real one, agents only count."""
    import faust

    from streams.app import create_app

    settings = Settings()
    app = create_app(settings)  # same settings; its agents are replaced below
    app.agents.clear()
    counter = redis.Redis.from_url(settings.redis.url)
    t = settings.topics
    for name in (t.queries, t.results, t.interactions):
        async def count(stream: faust.StreamT) -> None:
            async for events in stream.take_events(settings.streams.batch_size,
                                                   within=settings.streams.batch_within_s):
                counter.incrby("bench:noop", len(events))

        app.agent(app.topic(name, value_serializer="raw", key_serializer="raw"), name=f"noop-{name}")(count)
    faust.Worker(app, loglevel="warning", override_logging=False, quiet=True).execute_from_commandline()
    return 0


def freshness(settings: Settings, shape: Shape, rate: int, seconds: float,
              probe_every: int, tag: str = "") -> tuple[list[float], float, int]:
    """Publish ``rate`` events/s for ``seconds``; every ``probe_every``-th is a probe click of a new
    shopper whose key is polled for in Redis. Returns latencies (ms) and the rate achieved."""
    events = list(sessions(shape, int(rate * seconds / 2.9) + 100, tag=f"fresh{tag}",
                           start=START + timedelta(days=2 if tag else 1)))[: int(rate * seconds)]
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def poll() -> None:
        store = RedisStore(connect(settings.redis), settings.features, settings.streams)
        while not stop.is_set() or len(seen) < len(sent):
            with lock:
                waiting = [u for u in sent if u not in seen]
            if waiting:
                res = store.have_users(waiting)
                now = time.perf_counter()
                for u, ok in zip(waiting, res, strict=True):
                    if ok:
                        seen[u] = now
            if stop.is_set() and time.perf_counter() - stopped_at[0] > 180:
                break
            time.sleep(0.0005)

    stopped_at = [0.0]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    producer = kafka.producer(settings)
    # A frontend's producer is long-lived: let this one get its idempotent producer id first,
    # or the first ~0.5 s of events queue behind it and are charged to the worker.
    warmup = Click(event_id=f"warmup{tag}", user_id=f"warmup{tag}", session_id="s", product_id="p1",
                   timestamp=events[0].timestamp)
    warmup_topic, warmup_key = route(settings, warmup)
    producer.produce(warmup_topic, encode(warmup), key=warmup_key.encode())
    producer.flush(30)
    tick, per_tick = 0.01, max(1, rate // 100)
    started = time.perf_counter()
    for i in range(0, len(events), per_tick):
        for j, ev in enumerate(events[i : i + per_tick], start=i):
            if j % probe_every == 0:
                probe = f"probe{tag}-{j}"
                ev = Click(event_id=probe, user_id=probe, session_id="s", product_id="p1",
                           timestamp=ev.timestamp)
                topic, key = route(settings, ev)
                with lock:
                    sent[probe] = time.perf_counter()
            else:
                topic, key = route(settings, ev)
            producer.produce(topic, encode(ev), key=key.encode())
        producer.poll(0)
        next_at = started + (i // per_tick + 1) * tick
        time.sleep(max(0.0, next_at - time.perf_counter()))
    achieved = len(events) / (time.perf_counter() - started)
    producer.flush(30)
    stopped_at[0] = time.perf_counter()
    stop.set()
    poller.join(200)
    lat = [(seen[u] - sent[u]) * 1000 for u in sent if u in seen]
    if len(lat) < len(sent):
        print(f"warning: {len(sent) - len(lat)} of {len(sent)} probes not in Redis 180 s after the end")
    return lat, achieved, len(sent)


def bytes_per_user(client: Client, shards: Shards, users: list[str], sample: int = 2000
                   ) -> tuple[float, int, int]:
    picked = random.Random(1).sample(users, min(sample, len(users)))
    with client.pipeline(transaction=False) as pipe:
        for u in picked:
            pipe.memory_usage(keys.user(u, shards.tag_of(u)), samples=0)
        sizes = [s for s in pipe.execute() if s]
    return float(np.mean(sizes)), int(np.percentile(sizes, 99)), len(sizes)


def read_cost(settings: Settings, client: Client, events: list[Event], product_ids: list[str],
              n: int = 300, candidates: int = 100) -> dict[str, float]:
    """What the scorer's read of one query's features costs on this state (``features.read``, one
    query per call, as at 100 q/s): this process's CPU, Redis's CPU (over the primaries), wall."""
    store = RedisStore(client, settings.features, settings.streams)
    rnd = random.Random(3)
    searches = [e for e in events if isinstance(e, Query)]
    requests = [Request.for_text(q.user_id, q.text, rnd.sample(product_ids, candidates))
                for q in rnd.sample(searches, n)]
    now = searches[-1].timestamp.timestamp()
    for r in requests[:20]:  # warm: the speller's dictionary, connections
        read_batch(store, [r], now)
    cpu0, wall0, (redis0, _) = time.process_time(), time.perf_counter(), redis_cpu_s(client)
    for r in requests:
        read_batch(store, [r], now)
    cpu1, wall1, (redis1, _) = time.process_time(), time.perf_counter(), redis_cpu_s(client)
    return {"read_cpu_ms": round((cpu1 - cpu0) * 1000 / n, 3),
            "read_redis_cpu_ms": round((redis1 - redis0) * 1000 / n, 3),
            "read_wall_ms": round((wall1 - wall0) * 1000 / n, 3)}


def redis_used_memory(client: Client) -> int:
    """Bytes Redis holds (``used_memory``), over a cluster's primaries."""
    if not isinstance(client, RedisCluster):
        return int(client.info("memory")["used_memory"])
    return sum(int(client.info("memory", target_nodes=node)["used_memory"])
               for node in client.get_primaries())


def raw_cluster_ops(url: str) -> float:
    """Pipelined SETs over the cluster's primaries (redis-benchmark --cluster)."""
    host, port = re.match(r"rediss?://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    out = subprocess.run(["redis-benchmark", "--cluster", "-h", host, "-p", port, "-t", "set", "-P", "16",
                          "-n", "1000000", "-r", "100000", "-q", "--csv"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    row = next(line for line in out.splitlines() if line.startswith('"SET"'))
    return float(row.split(",")[1].strip('"'))


def cluster_settings(settings: Settings, shards: int) -> Settings:
    """``settings`` on the Redis Cluster of ``make up-redis-cluster``, the state in ``shards``."""
    url = os.environ.get("SHOPRANK_BENCH_REDIS_CLUSTER_URL", "redis://127.0.0.1:17000/0")
    return settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": url, "cluster": True}),
        "features": settings.features.model_copy(update={"shards": shards})})


def flush(client: Client) -> None:
    if isinstance(client, RedisCluster):
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.flushdb()


def measure(args: argparse.Namespace, settings: Settings, shape: Shape, products: list[Event],
            events: list[Event], users: list[str], broker: float, label: str) -> dict[str, object]:
    """One worker on ``settings``' Redis: backlog rate, freshness at ``--rate`` and at half the
    worker's rate, memory per shopper. ``settings``' topics hold ``products`` and ``events``."""
    client, shards = connect(settings.redis), Shards(settings.features.shards)
    flush(client)
    # Steady state: the catalog is known before the backlog of shopper events is replayed
    # (otherwise clicks racing ahead of their products' catalog records are dead-lettered).
    RedisStore(client, settings.features, settings.streams).apply_batch([Record(p) for p in products])
    env = environment(settings, group_id=f"bench-{uuid.uuid4().hex[:6]}", engine=args.engine,
                      batch_size=args.batch, batch_within_s=args.within)
    worker = Worker(env, Path(args.log))
    try:
        eps, cpu = worker_eps(client, shards, len(events), worker)
        print(f"{label}worker_eps       {eps:12,.0f}   ({eps / broker:.1%} of raw_broker_eps); "
              f"CPU per event: worker {cpu['worker_cpu_us_per_event']} us, "
              f"Redis {cpu['redis_cpu_us_per_event']} us (replicas {cpu['replicas_cpu_us_per_event']} us)",
              flush=True)
        wait_until(lambda: stats(client, shards).get(keys.STATS_APPLIED, 0) >= len(events), 300,
                   what="backlog drained")
        lat, achieved, n_probes = freshness(settings, shape, args.rate, args.seconds, args.probe_every)
        # The same, at half the rate this worker sustained: its latency when it keeps up.
        half = max(100, int(eps / 2))
        lat_half, achieved_half, _ = freshness(settings, shape, half, args.seconds, args.probe_every,
                                               tag="half")
    finally:
        worker.stop()
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"{label}freshness        p50 {p50:.1f} ms, p99 {p99:.1f} ms at {achieved:,.0f} events/s "
          f"({len(lat)} probes)", flush=True)
    h50, h99 = np.percentile(lat_half, [50, 99])
    print(f"  at half worker_eps: p50 {h50:.1f} ms, p99 {h99:.1f} ms at {achieved_half:,.0f} events/s",
          flush=True)
    reads = read_cost(settings, client, events, [p.product_id for p in products])  # type: ignore[attr-defined]
    print(f"{label}read_batch       {reads['read_cpu_ms']:.2f} ms CPU here + "
          f"{reads['read_redis_cpu_ms']:.2f} ms in Redis, {reads['read_wall_ms']:.2f} ms wall per query "
          "of 100 candidates", flush=True)
    mean, p99_size, _ = bytes_per_user(client, shards, users)
    used = redis_used_memory(client)
    n_users = sum(1 for _ in client.scan_iter(keys.USER + "*", count=10000)) - len(lat) - len(lat_half)
    print(f"{label}bytes_per_user   {mean:12,.0f}   (p99 {p99_size}, {n_users} shoppers)", flush=True)
    flush(client)
    return {
        "worker_eps": round(eps),
        "worker_to_broker_ratio": round(eps / broker, 4),
        **cpu,
        "freshness_p50_ms": round(float(p50), 2),
        "freshness_p99_ms": round(float(p99), 2),
        "freshness_rate_eps": round(achieved),
        "freshness_probes": len(lat),
        "freshness_probes_sent": n_probes,
        "freshness_half_capacity": {"rate_eps": round(achieved_half), "p50_ms": round(float(h50), 2),
                                    "p99_ms": round(float(h99), 2), "probes": len(lat_half)},
        **reads,
        "redis_used_memory_bytes": used,
        "bytes_per_user": round(mean),
        "bytes_per_user_p99": p99_size,
        "shoppers": n_users,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    shape = Shape(users=args.users, products=args.products, categories=100, brands=50)
    products: list[Event] = list(catalog(shape))
    events: list[Event] = list(sessions(shape, args.queries))
    users = sorted({e.user_id for e in events})  # type: ignore[union-attr]
    print(f"bench: {len(events)} events, {len(users)} shoppers, {len(products)} products", flush=True)
    load = os.getloadavg()
    out: dict[str, object] = {}
    # Each topology reads topics of its own: the same events, and none of the other's probes.
    for topology in ("single", "cluster"):
        if args.topology not in (topology, "both"):
            continue
        settings = bench_settings()
        ensure_topics(kafka.admin_client(settings), topic_specs(settings))
        try:
            publish(settings, [*products, *events])
            if "raw_broker_eps" not in out:
                out["raw_broker_eps"] = round(raw_broker_eps(settings, len(events)))
                print(f"raw_broker_eps   {out['raw_broker_eps']:12,}", flush=True)
            broker = float(out["raw_broker_eps"])  # type: ignore[arg-type]
            if topology == "single":
                client = connect(settings.redis)
                redis_ops = raw_redis_ops(settings)
                client.flushdb()
                print(f"raw_redis_ops    {redis_ops:12,.0f}", flush=True)
                noop = faust_noop_eps(settings, client, len(events)) if args.noop else None
                if noop is not None:
                    print(f"faust_noop_eps   {noop:12,.0f}   (faust alone, agents that only count)",
                          flush=True)
                out |= {"raw_redis_ops": round(redis_ops), "faust_noop_eps": round(noop) if noop else None}
                out |= measure(args, settings, shape, products, events, users, broker, "")
            else:
                sharded = cluster_settings(settings, args.shards)
                cluster_ops = raw_cluster_ops(sharded.redis.url)
                print(f"raw_cluster_ops  {cluster_ops:12,.0f}", flush=True)
                figures = measure(args, sharded, shape, products, events, users, broker, "cluster_")
                out |= {"raw_cluster_ops": round(cluster_ops)}
                out |= {f"cluster_{k}": v for k, v in figures.items()}
                out |= {"cluster_shards": args.shards, "cluster_primaries": primaries(connect(sharded.redis))}
        finally:
            admin = kafka.admin_client(settings)
            for fut in admin.delete_topics([s.name for s in topic_specs(settings)]).values():
                fut.result()
    return out | {
        "topology": args.topology,
        "events": len(events),
        "workers": 1,
        "engine": args.engine,
        "batch_size": args.batch,
        "batch_within_s": args.within,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def primaries(client: Client) -> int:
    return len(client.get_primaries()) if isinstance(client, RedisCluster) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--products", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=145_000, help="searches (about 3 events each)")
    parser.add_argument("--batch", type=int, default=Settings().streams.batch_size)
    parser.add_argument("--within", type=float, default=Settings().streams.batch_within_s,
                        help="seconds an agent waits to fill a batch")
    parser.add_argument("--rate", type=int, default=5000, help="events/s of the freshness stream")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--log", default="var/bench-streams-worker.log")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--engine", choices=["batch", "faust"], default=Settings().streams.engine,
                        help="the worker's engine (SHOPRANK_STREAMS_ENGINE)")
    parser.add_argument("--noop", action="store_true",
                        help="also measure faust_noop_eps: faust agents that only count")
    parser.add_argument("--noop-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topology", choices=["single", "cluster", "both"], default="both",
                        help="one Redis, the Redis Cluster (make up-redis-cluster), or both in one run")
    parser.add_argument("--shards", type=int, default=6,
                        help="owner shards of the feature state on the cluster (SHOPRANK_FEATURES_SHARDS)")
    args = parser.parse_args()
    if args.noop_worker:
        return noop_worker()
    configure_logging("WARNING")
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
