"""The closed loop, measured: ``make bench-trainer`` -> bench/results/trainer.json.

A fresh engine (its own topics, Redis database and model registry) serves a zero-shot version
(the pretrained encoder's text match, no data yet), with a feature worker, the embedder, the
joiner and a scorer running as real processes. The catalog is published; Best Buy's training
period is replayed through it in event time (replay.live: each search ranked before its clicks
exist, the whole catalog as candidates, clicks carrying the served position); event time is
then moved past every attribution window, so the joiner emits every list. Then one incremental
cycle of ``shoprank trainer --once`` (fine-tune from the serving version on the labeled lists
from the stream, gate on the freshest ones, promote or reject), timed. Then a product published
after training is searched for by its own title, and a 100-candidate result's size on the wire
is taken from a real result.

Figures: ``cycle_s`` (target <= 120 s on this 2-core machine), ``lists``, ``click_coverage``
(>= 0.99), ``result_bytes_100`` (<= 94 KB / 5), ``new_product_rank`` (1), ``gate``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from bench.engine import Services, advance_event_time, ask, delete_topics, engine_env, labeled_count
from bench.isolation import isolated_settings
from bench.result_size import wire_bytes
from core import kafka
from core.events import CatalogProduct, encode
from core.layout import product_tower
from core.processes import wait_until
from core.registry import load_version, serving_version, set_serving
from core.settings import ROOT
from core.topics import ensure_topics, topic_specs
from evaluation.splits import bestbuy_split
from features.embeddings import ProductEmbeddings
from replay.live import LiveReplay
from replay.to_events import Stream, bestbuy_replay
from streams.joiner import stored_totals

RESULTS = ROOT / "bench" / "results" / "trainer.json"
BENCH_DB = 11  # tests use 15 (and 12-14 beside them), bench.scorer 13, bench.streams 14
NEW_PRODUCT = CatalogProduct(
    product_id="bench-new-1", title="Galactic Hoverboard Racing Championship for Xbox 360",
    description="Race hoverboards through twelve galaxies with up to four friends.",
    brand="Nebula Games", category_path=["Video Games", "Xbox 360", "Xbox 360 Games"], price=39.99,
    updated_at=datetime(2011, 10, 20, tzinfo=UTC))


def _print(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> dict[str, object]:
    from trainer.zero_shot import zero_shot_version

    settings = isolated_settings(BENCH_DB)
    work = ROOT / "var" / "bench-trainer"
    shutil.rmtree(work, ignore_errors=True)
    registry = work / "models"
    registry.mkdir(parents=True)
    model = settings.model.model_copy(update={"registry_dir": registry})
    settings = settings.model_copy(update={"model": model})
    ensure_topics(kafka.admin_client(settings), topic_specs(settings))
    client = redis.Redis.from_url(settings.redis.url)
    client.flushdb()
    version = zero_shot_version(registry)
    set_serving(registry, version.version)
    _print(f"registry {registry}: zero-shot version {version.version} serving")

    split = bestbuy_split(settings.data_dir)
    replay = bestbuy_replay(settings.data_dir)
    period = [e for e in replay.events if e.timestamp < split.cutoff]
    if args.searches:
        searches = [e for e in period if e.stream is Stream.QUERIES][: args.searches]
        last = searches[-1].timestamp
        period = [e for e in period if e.timestamp <= last]
    catalog_ids = [e.event.product_id for e in replay.catalog]  # type: ignore[union-attr]

    env = engine_env(settings, registry, args.port, len(catalog_ids))
    logs = work / "logs"
    services = Services(logs)
    procs = {name: services.start(name, env) for name in ("streams", "embedder", "joiner", "scorer")}
    try:
        started = time.monotonic()
        n = kafka.producer(settings)
        for e in replay.catalog:
            n.produce(settings.topics.catalog, encode(e.event), key=e.key.encode())
        if n.flush(30):
            raise RuntimeError("catalog unacknowledged")
        from core.processes import http_ready

        wait_until(lambda: http_ready(f"http://127.0.0.1:{args.port}/readyz"), 180, 0.5, "scorer ready")
        tower = product_tower(version.manifest)
        assert tower is not None, "a zero-shot version ships its product tower"
        embedded = ProductEmbeddings(client, tower.id)
        wait_until(lambda: embedded.count() >= len(catalog_ids), 300, 0.5, "the catalog embedded")
        n_searches = sum(e.stream is Stream.QUERIES for e in period)
        _print(f"engine up in {time.monotonic() - started:.1f} s; replaying {n_searches:,} searches of the "
               "training period in event time")
        # A new scorer group starts from the queries topic's end once its partitions are assigned:
        # one search answered proves it is reading before the replay starts.
        # Stamped before the log starts: a search from the replay's future would move event time.
        ask(settings, "warm up", catalog_ids[:10], period[0].timestamp - timedelta(seconds=1), retries=10)
        with LiveReplay(settings, candidates=catalog_ids, step_searches=args.step_searches,
                        step_s=args.step_s, progress=True) as live:
            stats = live.run(period)
        _print(f"replay: {stats.searches:,} searches ({stats.unanswered} unanswered), {stats.clicks:,} "
               f"clicks in {stats.seconds:.0f} s")
        advance_event_time(settings, (stats.last or split.cutoff) + timedelta(days=2))
        expected = stats.answered
        wait_until(lambda: labeled_count(settings) >= expected * 0.99
                   or any(not p.alive() for p in procs.values()), 600, 1.0, "labeled lists")
        time.sleep(2.0)  # the joiner's last batch, if any, settles
        totals = stored_totals(client, settings.topics.partitions)
        lists_on_topic = labeled_count(settings)
        coverage = (totals["matched"] + totals["off_list"]) / totals["clicks"] if totals["clicks"] else 0.0
        _print(f"joiner: {lists_on_topic:,} lists, click coverage {coverage:.4f} ({totals})")

        cycle_started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "shoprank", "trainer", "--once"], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        cycle_s = time.monotonic() - cycle_started
        (logs / "trainer.log").write_text(out.stdout + out.stderr)
        _print(f"trainer --once: exit {out.returncode} in {cycle_s:.1f} s: "
               f"{out.stdout.strip().splitlines()[-1:]}")
        candidates = sorted(p.name for p in registry.iterdir() if p.is_dir() and p.name != version.version
                            and not p.name.startswith("."))
        manifest = load_version(registry, candidates[-1]).manifest if candidates else {}

        after = (stats.last or split.cutoff) + timedelta(days=2, hours=1)
        published = time.monotonic()
        kafka.send_acked(kafka.producer(settings), settings.topics.catalog,
                         [(NEW_PRODUCT.product_id.encode(), encode(NEW_PRODUCT), None)])
        rank, new_product_s = None, None
        while rank is None and time.monotonic() - published < 120:  # embedder, then scorer refresh
            new = ask(settings, NEW_PRODUCT.title, None, after)
            rank = next((p.position for p in new.products if p.product_id == NEW_PRODUCT.product_id), None)
            new_product_s = time.monotonic() - published
        _print(f"new product: rank {rank} for its own title, {new_product_s:.1f} s after publishing")
        sized = ask(settings, "call of duty", catalog_ids[:100], after)
        dead = [name for name, p in procs.items() if not p.alive()]
    finally:
        services.stop()
        if not args.keep_topics:  # a full run leaves ~1.5 GB of topics behind
            delete_topics(settings)
    return {
        "cycle_s": round(cycle_s, 1),
        "cycle_exit": out.returncode,
        "cycle_phases_s": manifest.get("cycle", {}).get("phases_s"),
        "lists": manifest.get("data_window", {}).get("train_lists"),
        "labeled_lists": lists_on_topic,
        "click_coverage": round(coverage, 4),
        "joiner": totals,
        "result_bytes_100": wire_bytes(sized),
        "result_products": len(sized.products),
        "new_product_rank": rank,
        "new_product_s": round(new_product_s, 2) if new_product_s is not None else None,
        "gate": manifest.get("gate"),
        "candidate_version": candidates[-1] if candidates else None,
        "serving_after": serving_version(registry),
        "replay": {"searches": stats.searches, "unanswered": stats.unanswered, "clicks": stats.clicks,
                   "clicks_shown": stats.clicks_shown, "seconds": round(stats.seconds, 1),
                   "step_searches": args.step_searches},
        "processes_died": dead,
        "host": platform.node(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": args.command,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=0, help="replay only the first N searches (0: all)")
    parser.add_argument("--step-searches", type=int, default=64, help="searches ranked per replay step")
    parser.add_argument("--step-s", type=float, default=1800.0,
                        help="event time one replay step spans at most (its searches see earlier steps' "
                             "clicks)")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--keep-topics", action="store_true", help="leave the run's topics for inspection")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--command", default="make bench-trainer")
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    shown = {k: v for k, v in result.items() if k not in ("joiner", "replay")}
    _print(json.dumps(shown, indent=2, default=str))
    _print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
