"""Hot-swap soak: ``make bench-swap`` -> bench/results/swap.json.

The question a shop asks of hot swaps is whether one ever costs a query, and what hundreds of
them do to latency and memory (Triton's open reports: memory lost on each load/unload cycle,
latency creeping up after a day of reloads, latency spikes on reload). One run, through the
local Kafka and Redis, the scorer as its own process (``python -m shoprank scorer``):

- two real-size versions (the MiniLM zero-shot version, :func:`trainer.zero_shot.zero_shot_version`,
  twice: different seeds, so different ranking heads; 260 MB of files each, the query encoder's
  90 MB graph loaded again on every swap) in a temporary registry;
- Best Buy searches with 100 candidates each (bench.scorer.query_specs) at a steady 100/s
  (bench.loadgen, open loop), shopper and product features seeded from the training period
  (bench.scorer.seed_features);
- first a steady phase without swaps (``p99_ms_steady``), then a phase of the same length in
  which a ModelUpdate is announced every ``--interval-s`` seconds: the two versions in turn, and
  every 10th announcement a corrupt version, four kinds in rotation (a graph whose bytes do not
  match the manifest the announcement names; a graph onnxruntime cannot parse, its manifest
  rewritten to match; NaN weights, which load but fail the warm-up; a sound copy announced with
  the wrong manifest hash);
- latency = a query's ``produce()`` call to its result consumed (bench.loadgen's clock), the same
  in both phases; each swap's outcome is read from the scorer's own log (``model_swapped`` /
  ``model_swap_rejected``), not its HTTP API, so observing it costs the scorer nothing;
- RSS of the scorer process, read before each announcement (the previous swap settled);
  ``rss_mb_first`` after the first 10 swaps, ``rss_mb_last`` after the last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import redis
import structlog

from bench.isolation import isolated_settings
from bench.loadgen import LoadGenerator
from bench.scorer import (
    ModelChoice,
    check_sample,
    cpu_name,
    free_port,
    memory_mb,
    query_specs,
    scorer_env,
    scorer_process,
    seed_features,
)
from core import kafka, layout
from core.events import ModelUpdate, encode
from core.logs import configure_logging
from core.processes import process_cpu_s
from core.registry import MANIFEST, ModelVersion, set_serving, uri
from core.settings import Settings
from core.topics import ensure_topics, topic_specs
from evaluation.splits import bestbuy_split
from features.redis_store import RedisStore, connect

log = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "swap.json"
BENCH_DB = 9  # bench.scorer uses 13, the tests 15
CORRUPT_EVERY = 10
FIRST_SWAPS = 10  # rss_mb_first: after this many swaps
AFTER_SWAP_S = 1.0  # queries published this long after an announcement count as "around a swap"
OUTCOME_TIMEOUT_S = 60.0
WINDOW_S = 30.0
P99_RATIO_TARGET = 2.0
RSS_GROWTH_TARGET_PCT = 5.0
CORRUPT_KINDS = ("file_hash", "unparseable_graph", "nan_weights", "announcement_hash")


@dataclass(frozen=True)
class Corrupt:
    """A version that must be rejected: its folder name and the hash its announcement carries."""

    version: str
    kind: str
    manifest_sha256: str


@dataclass
class Announcement:
    index: int
    version: str
    kind: str  # "good" or one of CORRUPT_KINDS
    at: float  # perf_counter at the announcement
    rss_mb_before: float
    outcome: str | None = None  # "swapped", "rejected" or None (no outcome logged in time)
    outcome_s: float | None = None  # announcement -> outcome read from the scorer's log
    reason: str | None = None


# --- the versions ------------------------------------------------------------------------------


def good_versions(registry: Path, seeds: tuple[int, int]) -> list[ModelVersion]:
    """Two real-size zero-shot versions (MiniLM query encoder, product tower, head by seed)."""
    from trainer.zero_shot import zero_shot_version

    return [zero_shot_version(registry, f"swap-{name}-s{seed}", seed=seed)
            for name, seed in zip("ab", seeds, strict=True)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clone(good: ModelVersion, folder: Path, replace: dict[str, bytes]) -> None:
    """``good``'s files hard-linked into ``folder`` (no 270 MB copies), except ``replace``'s,
    written as new files (never through a link: ``good`` stays intact)."""
    folder.mkdir()
    for src in good.path.iterdir():
        if src.name in replace:
            (folder / src.name).write_bytes(replace[src.name])
        else:
            os.link(src, folder / src.name)


def corrupt_versions(registry: Path, good: ModelVersion) -> list[Corrupt]:
    """One corrupt version of each kind, built from ``good`` (announced in rotation)."""
    import onnx
    from onnx import numpy_helper

    head = (good.path / layout.RANKER_HEAD).read_bytes()
    broken = head[: len(head) // 2]  # a truncated graph
    manifest = json.loads((good.path / MANIFEST).read_text())
    out = []

    # The manifest (and so the announcement's hash) is the sound version's; the graph is not.
    name = "corrupt-file-hash"
    _clone(good, registry / name, {layout.RANKER_HEAD: broken})
    out.append(Corrupt(name, "file_hash", good.manifest_sha256))

    # Every hash matches (the manifest rewritten for the broken graph): onnxruntime must refuse it.
    name = "corrupt-unparseable-graph"
    body = json.dumps({**manifest, "files": {**manifest["files"], layout.RANKER_HEAD: _sha(broken)}}).encode()
    _clone(good, registry / name, {layout.RANKER_HEAD: broken, MANIFEST: body})
    out.append(Corrupt(name, "unparseable_graph", _sha(body)))

    # A graph that loads and whose hashes match, with a NaN weight: the warm-up batch must catch it.
    graph = onnx.load_from_string(head)
    for init in graph.graph.initializer:
        if init.name.endswith("text_scale"):
            init.CopyFrom(numpy_helper.from_array(np.array(np.nan, np.float32), init.name))
            break
    else:
        raise RuntimeError("no text_scale weight in the ranker head to break")
    nan_head = graph.SerializeToString()
    files = {**manifest["files"], layout.RANKER_HEAD: _sha(nan_head)}
    body = json.dumps({**manifest, "files": files}).encode()
    name = "corrupt-nan-weights"
    _clone(good, registry / name, {layout.RANKER_HEAD: nan_head, MANIFEST: body})
    out.append(Corrupt(name, "nan_weights", _sha(body)))

    # A sound copy, announced with a hash that is not its manifest's.
    name = "corrupt-announcement-hash"
    _clone(good, registry / name, {})
    out.append(Corrupt(name, "announcement_hash", _sha(b"some other manifest")))
    return out


# --- observing the scorer ----------------------------------------------------------------------


class SwapLog:
    """The scorer's swap outcomes, read from its JSON log as it grows."""

    EVENTS: ClassVar[dict[str, str]] = {"model_swapped": "swapped", "model_swap_rejected": "rejected"}

    def __init__(self, path: Path) -> None:
        self._fh = path.open()
        self._partial = ""
        self.outcomes: list[tuple[str, str, str | None]] = []  # (version, outcome, reason)

    def read(self) -> None:
        chunk = self._fh.read()
        if not chunk:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if '"model_swap' not in line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            outcome = self.EVENTS.get(rec.get("event", ""))
            if outcome is not None:
                self.outcomes.append((rec.get("model_version", ""), outcome, rec.get("reason")))

    def close(self) -> None:
        self._fh.close()


def _host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Usage:
    """CPU used over a phase: the scorer process in cores, the host's busy share."""

    pid: int
    t0: float = field(default_factory=time.perf_counter)
    proc0: float = 0.0
    host0: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.proc0 = process_cpu_s(self.pid)
        self.host0 = _host_ticks()

    def done(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.t0
        busy, total = _host_ticks()
        return {"scorer_cores": round((process_cpu_s(self.pid) - self.proc0) / seconds, 3),
                "host_busy": round((busy - self.host0[0]) / max(1, total - self.host0[1]), 3)}


class Swapper(threading.Thread):
    """Announces a version every ``interval_s`` (never before the previous one's outcome is logged):
    the two good versions in turn, a corrupt one every ``CORRUPT_EVERY``-th time."""

    def __init__(self, settings: Settings, goods: list[ModelVersion], corrupt: list[Corrupt],
                 swap_log: SwapLog, pid: int, interval_s: float) -> None:
        super().__init__(name="swapper", daemon=True)
        self.settings = settings
        self.goods = goods
        self.corrupt = corrupt
        self.swap_log = swap_log
        self.pid = pid
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.announcements: list[Announcement] = []
        self.failure: BaseException | None = None
        self._producer = kafka.producer(settings)

    def _announce(self, version: str, sha: str, parent: str | None) -> None:
        update = ModelUpdate(model_version=version, parent_version=parent, uri=uri(version),
                             manifest_sha256=sha, created_at=datetime.now(UTC))
        kafka.send_acked(self._producer, self.settings.topics.model_updates,
                         [(b"model", encode(update), None)])

    def _await_outcome(self, a: Announcement) -> None:
        seen = len(self.swap_log.outcomes)
        deadline = a.at + OUTCOME_TIMEOUT_S
        while time.perf_counter() < deadline:
            self.swap_log.read()
            for version, outcome, reason in self.swap_log.outcomes[seen:]:
                if version == a.version:
                    a.outcome, a.outcome_s, a.reason = outcome, time.perf_counter() - a.at, reason
                    return
            seen = len(self.swap_log.outcomes)
            time.sleep(0.02)

    def run(self) -> None:
        try:
            serving = 0  # index into goods: the registry's SERVING version at start
            start = time.perf_counter()
            i = 0
            while not self.stopping.is_set():
                i += 1
                if i % CORRUPT_EVERY == 0:
                    bad = self.corrupt[(i // CORRUPT_EVERY - 1) % len(self.corrupt)]
                    version, kind, sha, nxt = bad.version, bad.kind, bad.manifest_sha256, serving
                else:
                    nxt = 1 - serving
                    good = self.goods[nxt]
                    version, kind, sha = good.version, "good", good.manifest_sha256
                rss, _ = memory_mb(self.pid)
                a = Announcement(i, version, kind, time.perf_counter(), rss)
                self.announcements.append(a)
                self._announce(version, sha, self.goods[serving].version)
                self._await_outcome(a)
                if a.outcome == "swapped":
                    serving = nxt
                # the next slot on the fixed schedule, or at once when this swap overran it
                self.stopping.wait(max(0.0, start + i * self.interval_s - time.perf_counter()))
        except BaseException as exc:  # reported by the main thread
            self.failure = exc


# --- figures -----------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float | None:
    return round(float(np.percentile(values, p)), 2) if values else None


def phase_figures(timings: list[tuple[float, float | None]], start: float) -> dict[str, object]:
    answered = [lat for _, lat in timings if lat is not None]
    windows = []
    if timings:
        end = max(t for t, _ in timings)
        w = start
        while w <= end:
            lat = [x for t, x in timings if w <= t < w + WINDOW_S and x is not None]
            windows.append({"from_s": round(w - start), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                            "max_ms": round(max(lat), 1) if lat else None, "answered": len(lat)})
            w += WINDOW_S
    return {"sent": len(timings), "answered": len(answered), "p50_ms": _pct(answered, 50),
            "p90_ms": _pct(answered, 90), "p99_ms": _pct(answered, 99), "p999_ms": _pct(answered, 99.9),
            "max_ms": round(max(answered), 1) if answered else None, "windows": windows}


def near_swaps(timings: list[tuple[float, float | None]], announced: list[float]) -> list[float]:
    """Latencies of the queries published within AFTER_SWAP_S after an announcement."""
    marks = np.sort(np.asarray(announced))
    out = []
    for t, lat in timings:
        if lat is None or not len(marks):
            continue
        k = np.searchsorted(marks, t, side="right") - 1
        if k >= 0 and t - marks[k] < AFTER_SWAP_S:
            out.append(lat)
    return out


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    settings = isolated_settings(BENCH_DB)
    ensure_topics(kafka.admin_client(settings), topic_specs(settings))
    client = redis.Redis.from_url(settings.redis.url)
    client.flushdb()
    registry = Path(tempfile.mkdtemp(prefix="shoprank-bench-swap-"))
    load_start = os.getloadavg()
    try:
        started = time.perf_counter()
        goods = good_versions(registry, tuple(args.seeds))  # type: ignore[arg-type]
        corrupt = corrupt_versions(registry, goods[0])
        set_serving(registry, goods[0].version)
        size_mb = sum(p.stat().st_size for p in goods[0].path.iterdir()) / 2**20
        print(f"registry {registry}: {goods[0].version}, {goods[1].version} ({size_mb:.0f} MB each), "
              f"{len(corrupt)} corrupt versions, in {time.perf_counter() - started:.0f}s", flush=True)

        split = bestbuy_split(settings.data_dir)
        store = RedisStore(connect(settings.redis), settings.features, settings.streams)
        applied = seed_features(store, split)
        from scorer.embedder import embed_catalog

        for good in goods:  # one tower for both (the same product encoder): the second pass is a no-op
            embed_catalog(store.client, good)
        print(f"feature store: {len(split.catalog)} products embedded, {applied} training-period events "
              f"applied; {time.perf_counter() - started:.0f}s since start", flush=True)
        specs = query_specs(split)

        group = f"bench-swap-{uuid.uuid4().hex[:6]}"
        port = free_port()
        model = ModelChoice(registry, goods[0].version, tiny=False)
        env = scorer_env(settings, model, port, group, {"SHOPRANK_LOG_LEVEL": "INFO"})
        log_path = Path(args.log)
        with scorer_process(env, log_path, port) as proc:
            swap_log = SwapLog(log_path)
            gen = LoadGenerator(settings, specs, group)
            gen.start()
            try:
                warmed = gen.warm(args.warm_qps, args.warm_s)
                check_sample(gen.sample)
                print(f"scorer pid {proc.pid} ready, serving {goods[0].version}; warm-up answered {warmed}",
                      flush=True)

                usage = Usage(proc.pid)
                t_steady = time.perf_counter()
                steady = gen.step(args.qps, args.steady_s)
                steady_timings = gen.latencies(gen.last_sent)
                steady_cpu = usage.done()
                rss_steady, _ = memory_mb(proc.pid)
                print(f"steady    p50 {steady.p50_ms:.1f} ms  p99 {steady.p99_ms:.1f} ms  "
                      f"sent {steady.sent}  answered {steady.answered}  "
                      f"rss {rss_steady:.0f} MB  cpu {steady_cpu}", flush=True)

                swapper = Swapper(settings, goods, corrupt, swap_log, proc.pid, args.interval_s)
                usage = Usage(proc.pid)
                t_swap = time.perf_counter()
                swapper.start()
                swapping = gen.step(args.qps, args.swap_s)
                swapping_timings = gen.latencies(gen.last_sent)
                swapper.stopping.set()
                swapper.join(OUTCOME_TIMEOUT_S + args.interval_s)
                swap_cpu = usage.done()
                if swapper.failure is not None:
                    raise RuntimeError(f"the swapper failed: {swapper.failure!r}") from swapper.failure
                time.sleep(args.interval_s)  # the last swap settles, as before every other reading
                rss_last, hwm = memory_mb(proc.pid)
                print(f"swapping  p50 {swapping.p50_ms:.1f} ms  p99 {swapping.p99_ms:.1f} ms  "
                      f"sent {swapping.sent}  answered {swapping.answered}  "
                      f"rss {rss_last:.0f} MB  cpu {swap_cpu}", flush=True)
                swap_log.read()
                deliveries = dict(gen.deliveries)
                served_by = dict(gen.served_by)
            finally:
                gen.close()
                swap_log.close()
    finally:
        admin = kafka.admin_client(settings)
        for fut in admin.delete_topics([s.name for s in topic_specs(settings)]).values():
            fut.result()
        client.flushdb()
        shutil.rmtree(registry, ignore_errors=True)
    load_end = os.getloadavg()

    anns = swapper.announcements
    good_anns = [a for a in anns if a.kind == "good"]
    bad_anns = [a for a in anns if a.kind != "good"]
    swapped = [a for a in good_anns if a.outcome == "swapped"]
    corrupt_names = {c.version for c in corrupt}
    logged_corrupt_swaps = [v for v, o, _ in swap_log.outcomes if o == "swapped" and v in corrupt_names]
    # rss after the first FIRST_SWAPS swaps: read before the announcement that follows the 10th
    first = next((a for a in anns if sum(1 for s in swapped if s.index < a.index) == FIRST_SWAPS), None)
    rss_first = first.rss_mb_before if first else None
    duplicates = sum(1 for n in deliveries.values() if n > 1)
    st = phase_figures(steady_timings, t_steady)
    sw = phase_figures(swapping_timings, t_swap)
    near = near_swaps(swapping_timings, [a.at for a in swapped])
    outcome_s = [a.outcome_s for a in swapped if a.outcome_s is not None]
    gaps = np.diff([a.at for a in anns]) if len(anns) > 1 else np.array([])
    p99_st, p99_sw = st["p99_ms"], sw["p99_ms"]
    ratio = round(p99_sw / p99_st, 2) if p99_st and p99_sw else None  # type: ignore[operator]
    growth = round(100 * (rss_last - rss_first) / rss_first, 2) if rss_first else None
    dropped = (st["sent"] - st["answered"]) + (sw["sent"] - sw["answered"])  # type: ignore[operator]
    result: dict[str, object] = {
        "dropped": dropped,
        "duplicates": duplicates,
        "errors": steady.errors + swapping.errors,
        "p99_ms_steady": p99_st,
        "p99_ms_swapping": p99_sw,
        "p99_ratio": ratio,
        "p99_ms_after_swap": _pct(near, 99),
        "rss_mb_first": round(rss_first, 1) if rss_first else None,
        "rss_mb_last": round(rss_last, 1),
        "rss_growth_pct": growth,
        "swaps": len(swapped),
        "rejected": sum(1 for a in bad_anns if a.outcome == "rejected"),
        "corrupt_announced": len(bad_anns),
        "corrupt_served": sum(served_by.get(v, 0) for v in corrupt_names) + len(logged_corrupt_swaps),
        "targets_met": {
            "dropped_0": dropped == 0,
            "p99_swapping_le_2x_steady": ratio is not None and ratio <= P99_RATIO_TARGET,
            "rss_growth_le_5pct": growth is not None and growth <= RSS_GROWTH_TARGET_PCT,
            "every_corrupt_rejected": all(a.outcome == "rejected" for a in bad_anns),
            "at_least_100_swaps": len(swapped) >= 100,
        },
        "qps": args.qps,
        "steady_s": args.steady_s,
        "swapping_s": args.swap_s,
        "announcements": len(anns),
        "announce_interval_s": {"target": args.interval_s,
                                "mean": round(float(gaps.mean()), 2) if gaps.size else None,
                                "max": round(float(gaps.max()), 2) if gaps.size else None},
        "swap_s": {"p50": _pct(outcome_s, 50), "p99": _pct(outcome_s, 99),
                   "max": round(max(outcome_s), 2) if outcome_s else None,
                   "what": "announcement published -> the scorer logs model_swapped "
                           "(verify, load, warm, switch)"},
        "good_not_swapped": [asdict(a) for a in good_anns if a.outcome != "swapped"],
        "rejections": {kind: sorted({(a.reason or "")[:160] for a in bad_anns if a.kind == kind})
                       for kind in CORRUPT_KINDS},
        "served_by": {str(k): v for k, v in sorted(served_by.items(), key=lambda kv: str(kv[0]))},
        "steady": st,
        "swapping": sw,
        "rss_mb_steady_end": round(rss_steady, 1),
        "rss_mb_peak": round(hwm, 1),
        "rss_mb_every_10th_swap": [round(a.rss_mb_before, 1) for a in anns
                                   if a.kind == "good" and a.index > 1
                                   and sum(1 for s in swapped if s.index < a.index) % 10 == 0],
        "cpu": {"steady": steady_cpu, "swapping": swap_cpu},
        "versions": [g.version for g in goods],
        "version_mb": round(size_mb, 1),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_name(),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in load_end],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": args.command,
        "notes": (
            f"Latency = produce() -> result consumed, the same clock in both phases; steady phase "
            f"{args.steady_s:.0f} s without swaps first, then {args.swap_s:.0f} s with an announcement "
            f"every {args.interval_s} s; dropped = measured queries never answered; duplicates = queries "
            f"answered more than once (warm-up included); p99_ms_after_swap = queries published within "
            f"{AFTER_SWAP_S:.0f} s after a swap was announced. RSS read before each announcement (the "
            f"previous swap settled); rss_mb_first after {FIRST_SWAPS} swaps. Versions of {size_mb:.0f} "
            f"MB; each swap verifies the files the scorer reads and loads the 90 MB query encoder anew; "
            f"the two versions share their query encoder and tokenizer, so the query cache is carried "
            f"over (a version with a fine-tuned encoder starts with an empty one). A 2-core host shared "
            f"with other jobs; Kafka, Redis and the load generator run on it too."
        ),
    }
    return result


def print_table(result: dict[str, object]) -> None:
    rows = [("dropped", "target 0"), ("duplicates", ""), ("errors", ""), ("p99_ms_steady", ""),
            ("p99_ms_swapping", "target <= 2x steady"), ("p99_ratio", ""), ("p99_ms_after_swap", ""),
            ("rss_mb_first", "after 10 swaps"), ("rss_mb_last", "target <= +5%"), ("rss_growth_pct", ""),
            ("swaps", "target >= 100"), ("rejected", "every corrupt one"), ("corrupt_announced", ""),
            ("corrupt_served", "target 0")]
    print()
    for key, comment in rows:
        print(f"  {key:18} {result[key]!s:>10}  {comment}")
    print(f"  targets met: {result['targets_met']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qps", type=float, default=100.0)
    parser.add_argument("--steady-s", type=float, default=300.0)
    parser.add_argument("--swap-s", type=float, default=300.0)
    parser.add_argument("--interval-s", type=float, default=2.5,
                        help="seconds between announcements (2.5: 120 in 300 s, 108 of them swaps)")
    parser.add_argument("--warm-qps", type=float, default=50.0)
    parser.add_argument("--warm-s", type=float, default=20.0)
    parser.add_argument("--seeds", type=int, nargs=2, default=[13, 14])
    parser.add_argument("--log", default=str(ROOT / "var" / "bench-swap.log"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--command", default="make bench-swap", help="recorded in the JSON")
    args = parser.parse_args()
    configure_logging("WARNING")
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
