"""Swap after swap (the scorer's ModelHolder, as ``make bench-swap`` drives it through Kafka): each
kind of corrupt version the soak announces is refused with its reason, a swapped-out version is
freed when the swap returns, a swap keeps the query cache only when the new version embeds
queries the same way, and versions share a query tokenizer only when they ship the same file and
read the same query length. (One swap through the broker: tests/test_scorer.py.)"""

from __future__ import annotations

import json
import shutil
import weakref
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from structlog.testing import capture_logs

from bench.swap import corrupt_versions
from core import layout
from core.events import ModelUpdate
from core.registry import MANIFEST, load_version, uri
from scorer.metrics import ScorerMetrics
from scorer.runtime import load_served_model, query_tokenizer
from scorer.swap import ModelHolder
from tests.model_factory import tiny_version

REASONS = {  # what the scorer says for each corrupt kind (bench.swap.CORRUPT_KINDS)
    "file_hash": "does not match its sha256",
    "unparseable_graph": "INVALID_PROTOBUF",
    "nan_weights": "non-finite scores on warm-up",
    "announcement_hash": "does not match the announcement",
}


def announced(version: str, sha: str) -> ModelUpdate:
    return ModelUpdate(model_version=version, uri=uri(version), manifest_sha256=sha,
                       created_at=datetime.now(UTC))


def test_alternating_swaps_free_the_old_version_and_refuse_every_corrupt_kind(tmp_path: Path) -> None:
    a = tiny_version(tmp_path, "a")
    b = tiny_version(tmp_path, "b", seed=14)
    corrupt = corrupt_versions(tmp_path, a)
    assert {c.kind for c in corrupt} == set(REASONS)
    metrics = ScorerMetrics()
    holder = ModelHolder(load_served_model(tmp_path, "a", device="cpu"), tmp_path, "cpu", metrics)
    for good in (b, a, b):
        old = weakref.ref(holder.current)
        assert holder.swap(announced(good.version, good.manifest_sha256))
        assert holder.current.version == good.version
        assert old() is None  # nothing keeps a swapped-out version (or its sessions) alive
    for bad in corrupt:
        with capture_logs() as logs:
            assert not holder.swap(announced(bad.version, bad.manifest_sha256)), bad.kind
        [rejected] = [e for e in logs if e["event"] == "model_swap_rejected"]
        assert REASONS[bad.kind] in rejected["reason"], (bad.kind, rejected["reason"])
        assert holder.current.version == "b"
    a_sha = a.manifest_sha256
    assert holder.swap(announced("a", a_sha)) and holder.current.version == "a"  # the sound one intact
    samples = {s.labels["outcome"]: s.value for s in metrics.swaps.collect()[0].samples
               if s.name.endswith("_total")}
    assert samples == {"swapped": 4.0, "rejected": float(len(corrupt))}


def test_a_swap_keeps_the_query_cache_only_for_the_same_query_side(tmp_path: Path) -> None:
    a = tiny_version(tmp_path, "a")
    b = tiny_version(tmp_path, "b", seed=14)  # its own query encoder
    # "a2": a's query side with b's ranking head, as a version that retrained its head only
    shutil.copytree(a.path, tmp_path / "a2")
    shutil.copy(b.path / layout.RANKER_HEAD, tmp_path / "a2" / layout.RANKER_HEAD)
    manifest = json.loads((a.path / MANIFEST).read_text())
    manifest["files"][layout.RANKER_HEAD] = b.manifest["files"][layout.RANKER_HEAD]
    (tmp_path / "a2" / MANIFEST).write_text(json.dumps(manifest))
    # The scorer verifies the files it reads, not the trainer's torch weights.
    (tmp_path / "a2" / layout.WEIGHTS).write_bytes(b"not read by a scorer")
    a2 = load_version(tmp_path, "a2", files=[layout.RANKER_HEAD])
    holder = ModelHolder(load_served_model(tmp_path, "a", device="cpu"), tmp_path, "cpu", ScorerMetrics())
    texts = ["velvet lamp", "brass kettle", "zinc harp"]  # in no version's query table: cached
    b_table = load_served_model(tmp_path, "b", device="cpu").queries
    assert not set(texts) & {*holder.current.queries.rows, *b_table.rows}
    embedded = holder.current.encode(texts)

    assert holder.swap(announced("a2", a2.manifest_sha256))
    model, hits = holder.current, holder.current.cache_hits
    assert np.array_equal(model.encode(texts), embedded) and model.cache_hits == hits + len(texts)
    assert holder.swap(announced("b", b.manifest_sha256))
    model, misses = holder.current, holder.current.cache_misses
    assert not np.allclose(model.encode(texts), embedded) and model.cache_misses == misses + len(texts)


def test_versions_share_a_query_tokenizer_only_for_the_same_file_and_length(tmp_path: Path) -> None:
    a = tiny_version(tmp_path, "a")
    tiny_version(tmp_path, "b", seed=14)
    first = load_served_model(tmp_path, "a", device="cpu")
    second = load_served_model(tmp_path, "b", device="cpu")
    assert first.tokenizer is second.tokenizer  # built once: no GIL-holding rebuild on a swap
    path, sha = a.path / layout.TOKENIZER, a.manifest["files"][layout.TOKENIZER]
    longer = query_tokenizer(path, sha, first.max_query_len + 8)
    assert longer is not first.tokenizer
    assert longer.truncation["max_length"] == first.max_query_len + 8
    assert first.tokenizer.truncation["max_length"] == first.max_query_len
    assert query_tokenizer(path, None, first.max_query_len) is not first.tokenizer  # unhashed: its own
    text = "call of duty black ops " * 20
    assert len(first.tokenizer.encode(text).ids) == first.max_query_len
