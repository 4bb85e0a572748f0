"""How big a ranked result is on the wire, in the old and the new format:
``.venv/bin/python -m bench.result_size`` -> bench/results/result_size.json and a table.

- old: every product carries its 28 served features as a named JSON map (the contract before
  issue 13), uncompressed (the scorer's producer sent ``compression.type: none``);
- new: one base64 float32 matrix for the list, tagged with the feature schema, and the history
  fed to the model (``core.events.ServedFeatures``), compressed with zstd as the scorer's
  producer now compresses it (:func:`wire_bytes`).

Feature values are real: the Best Buy catalog and the training period's searches and clicks
replayed into a memory feature store, then read (``features.read.read_batch``, the scorer's
read path) for test-period searches with 100 candidates each (``bench.scorer.query_specs``).
A 1,000-candidate result stacks the rows of 10 such searches (the catalog holds only 437
products) under distinct 7-digit ids, the length of Best Buy SKUs. Scores are float32 values
turned into Python floats, as the scorer writes them (full-length decimal reprs).

``--broker`` also publishes results through the local Kafka (a temporary topic) with the old
producer settings and the new ones and reports the bytes its reader received and the
publish-to-consume latency of each: the latency cost of compressing.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zstandard

from core.events import RankedProduct, RankedResult, ServedFeatures, encode
from features.read import FEATURE_NAMES, FEATURE_SCHEMA, Request, Result, read_batch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "result_size.json"
SEARCHES = 200  # test-period searches measured; figures are medians (and maxima) over them
WIDE = 10  # searches stacked into one 1,000-candidate result
ZSTD_LEVEL = 3  # librdkafka's zstd level when compression.level is left at its default (-1)
TODAY_100 = 94_000  # a 100-candidate result before issue 13, as measured then (bytes)
TARGET_100 = TODAY_100 // 5

_zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)


def wire_bytes(result: RankedResult | bytes) -> int:
    """A result's size on the wire: its JSON as the scorer's producer compresses it (zstd at
    librdkafka's default level). Kafka's framing (a record batch header, ~70 bytes, and the
    user-id key) comes on top."""
    raw = result if isinstance(result, bytes) else encode(result)
    return len(_zstd.compress(raw))


# --- the format before issue 13, for comparison ---------------------------------------------


class _OldProduct(msgspec.Struct, kw_only=True):
    product_id: str
    score: float
    position: int
    features: dict[str, float] | None = None


class _OldResult(msgspec.Struct, kw_only=True, tag="ranked_result", tag_field="type"):
    schema_version: int = 1
    query_id: str
    user_id: str
    session_id: str
    model_version: str
    products: list[_OldProduct]
    latency_ms: float = 0.0
    error: str | None = None
    timestamp: datetime


def old_format(result: RankedResult) -> bytes:
    """``result`` encoded as the old contract carried it: a named feature map per product."""
    assert result.features is not None
    rows = result.features.matrix(len(result.products)).tolist()
    products = [_OldProduct(product_id=p.product_id, score=p.score, position=p.position,
                            features=dict(zip(FEATURE_NAMES, row, strict=True)))
                for p, row in zip(result.products, rows, strict=True)]
    return msgspec.json.encode(_OldResult(
        query_id=result.query_id, user_id=result.user_id, session_id=result.session_id,
        model_version=result.model_version, products=products, latency_ms=result.latency_ms,
        timestamp=result.timestamp))


# --- realistic results ----------------------------------------------------------------------


def ranked_result(ids: Sequence[str], rows: np.ndarray, read: Result, text: str, user_id: str,
                  history_len: int, rng: np.random.Generator, query_n: int) -> RankedResult:
    """A result built as ``scorer.ranking`` builds one: products by score, the served matrix in
    that order, the history cut to the model's length."""
    scores = rng.normal(0.0, 2.0, len(ids)).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    products = [RankedProduct(product_id=ids[j], score=s, position=pos)
                for pos, (j, s) in enumerate(zip(order.tolist(), scores[order].tolist(), strict=True), 1)]
    k = min(history_len, len(read.recent_products))
    served = ServedFeatures.pack(FEATURE_SCHEMA, rows[order], list(read.recent_products[:k]),
                                 read.recent_weights[:k].tolist())
    return RankedResult(query_id=f"{uuid.UUID(int=query_n).hex}", user_id=user_id, session_id=user_id,
                        model_version="20261201-120000-abcdef", products=products, text=text,
                        features=served, latency_ms=12.345678, timestamp=datetime.now(UTC))


def build_results(searches: int = SEARCHES) -> tuple[list[RankedResult], list[RankedResult]]:
    """100-candidate results for ``searches`` test-period searches, and 1,000-candidate ones
    stacking ``WIDE`` of them each."""
    from bench.scorer import query_specs, seed_features
    from core.settings import Settings
    from evaluation.splits import bestbuy_split
    from features.memory import MemoryStore
    from trainer.model import RankerConfig

    settings = Settings()
    split = bestbuy_split(settings.data_dir)
    store = MemoryStore(settings.features)
    seed_features(store, split)  # type: ignore[arg-type]  # the same apply/apply_batch interface
    specs = query_specs(split)[:searches]
    reads = read_batch(store, [Request.for_text(s.user_id, s.text, list(s.candidates),
                                                positions=list(range(1, len(s.candidates) + 1)))
                               for s in specs],
                       now=max(s.timestamp.timestamp() for s in specs))
    history_len = RankerConfig.history_len  # the default the trainer builds versions with
    rng = np.random.default_rng(7)
    narrow = [ranked_result(s.candidates, r.features, r, s.text, s.user_id, history_len, rng, i)
              for i, (s, r) in enumerate(zip(specs, reads, strict=True))]
    wide = []
    for w in range(len(specs) // WIDE):
        group = range(w * WIDE, (w + 1) * WIDE)
        rows = np.concatenate([reads[i].features for i in group])
        ids = [f"{1_000_000 + w * 10_000 + j}" for j in range(len(rows))]
        s, r = specs[group[0]], reads[group[0]]
        wide.append(ranked_result(ids, rows, r, s.text, s.user_id, history_len, rng, 10_000 + w))
    return narrow, wide


def measure(results: list[RankedResult]) -> dict[str, Any]:
    """Median and largest bytes of the results, old and new, raw and compressed."""
    olds = [old_format(r) for r in results]
    news = [encode(r) for r in results]
    columns = {
        "old_raw": [len(b) for b in olds],
        "old_zstd": [wire_bytes(b) for b in olds],
        "new_raw": [len(b) for b in news],
        "new_zstd": [wire_bytes(b) for b in news],
    }
    out: dict[str, Any] = {"results": len(results), "products": len(results[0].products)}
    for name, sizes in columns.items():
        out[name] = int(statistics.median(sizes))
        out[f"{name}_max"] = max(sizes)
    started = time.perf_counter()
    for b in news:
        _zstd.compress(b)
    out["zstd_ms"] = round((time.perf_counter() - started) * 1000 / len(news), 3)
    matrices = [r.features.matrix(len(r.products)) for r in results if r.features is not None]
    out["nonzero_share"] = round(float(np.mean([np.count_nonzero(m) / m.size for m in matrices])), 3)
    return out


# --- through the broker ---------------------------------------------------------------------


def through_broker(payloads: list[bytes], rate: float = 100.0) -> dict[str, dict[str, float]]:
    """Each payload published at ``rate`` per second with the old producer settings (no
    compression) and the new (zstd), linger 0 both: the bytes the reader received from the
    broker per result and publish-to-consume latency (p50, p99)."""
    from confluent_kafka import TopicPartition

    from bench.isolation import isolated_settings
    from core import kafka
    from core.topics import ensure_topics, topic_specs

    settings = isolated_settings(13)
    spec = next(s for s in topic_specs(settings) if s.name == settings.topics.results)
    spec = type(spec)(spec.name, 1, spec.config)
    admin = kafka.admin_client(settings)
    ensure_topics(admin, [spec])
    out = {}
    try:
        for codec in ("none", "lz4", "zstd"):
            out[codec] = _publish_and_read(settings, spec.name, codec, payloads, rate, TopicPartition)
    finally:
        for fut in admin.delete_topics([spec.name], operation_timeout=30).values():
            fut.result()
    return out


def _publish_and_read(settings: Any, topic: str, codec: str, payloads: list[bytes], rate: float,
                      topic_partition: Any) -> dict[str, float]:
    from core import kafka

    producer = kafka.producer(settings, **{"linger.ms": 0, "compression.type": codec})
    producer.produce(topic, value=payloads[0])  # connected (and its producer id got) before timing
    producer.flush(30)
    stats: list[dict[str, Any]] = []
    consumer = kafka.consumer(settings, group_id=f"bench-size-{uuid.uuid4().hex[:6]}",
                              **{"statistics.interval.ms": 100, "fetch.wait.max.ms": 5,
                                 "stats_cb": lambda s: stats.append(json.loads(s))})
    _, high = consumer.get_watermark_offsets(topic_partition(topic, 0), timeout=10)
    consumer.assign([topic_partition(topic, 0, high)])
    latencies: list[float] = []
    done = threading.Event()

    def read() -> None:
        while len(latencies) < len(payloads) and not done.is_set():
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                latencies.append(time.time() * 1000 - msg.timestamp()[1])

    reader = threading.Thread(target=read)
    consumer.poll(0.5)  # connected and fetching before the first result
    rx_before = _rx(stats)
    reader.start()
    started = time.monotonic()
    for i, value in enumerate(payloads):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        producer.produce(topic, key=socket.gethostname().encode(), value=value)
        producer.poll(0)
    producer.flush(30)
    reader.join(timeout=60)
    done.set()
    seen = len(stats)
    deadline = time.monotonic() + 5
    while len(stats) == seen and time.monotonic() < deadline:
        consumer.poll(0.1)
    consumer.close()
    if len(latencies) < len(payloads):
        raise RuntimeError(f"{codec}: {len(latencies)} of {len(payloads)} results read back")
    return {"rx_bytes_per_result": round((_rx(stats) - rx_before) / len(payloads)),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2)}


def _rx(stats: list[dict[str, Any]]) -> int:
    return sum(b["rxbytes"] for b in stats[-1]["brokers"].values()) if stats else 0


# --- report ---------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'candidates':>10} {'old raw':>10} {'old zstd':>10} {'new raw':>10} {'new zstd':>10}"
          f" {'old/new wire':>13}   (bytes, median over the results)")
    for key in ("candidates_100", "candidates_1000"):
        m = report[key]
        print(f"{m['products']:>10} {m['old_raw']:>10,} {m['old_zstd']:>10,} {m['new_raw']:>10,} "
              f"{m['new_zstd']:>10,} {m['old_raw'] / m['new_zstd']:>12.1f}x")
    print(f"\nresult_bytes_100 = {report['result_bytes_100']:,} (target <= {TARGET_100:,}: "
          f"{'met' if report['result_bytes_100'] <= TARGET_100 else 'MISSED'})")
    for codec, row in report.get("broker", {}).items():
        print(f"broker, compression {codec:4}: {row['rx_bytes_per_result']:>8,} bytes received per "
              f"100-candidate result, publish-to-consume p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--searches", type=int, default=SEARCHES)
    parser.add_argument("--broker", action="store_true",
                        help="also publish through the local Kafka, without and with zstd")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    started = time.perf_counter()
    narrow, wide = build_results(args.searches)
    report: dict[str, Any] = {
        "candidates_100": measure(narrow),
        "candidates_1000": measure(wide),
        "codec": f"zstd level {ZSTD_LEVEL} (zstandard {zstandard.__version__})",
        "feature_schema": FEATURE_SCHEMA,
    }
    report["result_bytes_100"] = report["candidates_100"]["new_zstd"]
    report["target_100"] = TARGET_100
    if args.broker:
        report["broker"] = through_broker([encode(r) for r in narrow])
    report["host"] = socket.gethostname()
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = ".venv/bin/python -m bench.result_size" + (" --broker" if args.broker else "")
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
