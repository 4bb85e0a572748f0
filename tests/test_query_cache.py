"""The scorer's query-embedding cache: least recently used out, lookups exported to Prometheus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from scorer import runtime
from scorer.runtime import load_served_model
from tests.model_factory import tiny_version


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("shoprank_query_cache_lookups_total", {"result": result}) or 0.0


def test_query_embeddings_are_cached_least_recently_used_out_and_lookups_exported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_version(tmp_path, "a")
    monkeypatch.setattr(runtime, "QUERY_CACHE_SIZE", 2)
    model = load_served_model(tmp_path, "a", device="cpu")  # its warm-up encodes one text
    hits, misses = lookups("hit"), lookups("miss")
    first = model.encode(["halo 3", "wii fit", "halo 3"])  # one text twice in a batch: encoded once
    assert (lookups("hit") - hits, lookups("miss") - misses) == (0, 2)
    assert np.array_equal(model.encode(["halo 3"]), first[:1])  # a hit: now the most recent
    model.encode(["zelda"])  # full: the least recently used ("wii fit") goes
    assert (lookups("hit") - hits, lookups("miss") - misses) == (1, 3)
    model.encode(["halo 3", "wii fit"])
    assert (lookups("hit") - hits, lookups("miss") - misses) == (2, 4)
    assert (model.cache_hits, model.cache_misses) == (2, 5)  # the warm-up's miss too
