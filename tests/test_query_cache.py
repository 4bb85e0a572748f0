"""The scorer's query-embedding cache: least recently used out, lookups exported to Prometheus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from prometheus_client import REGISTRY
from tokenizers import Tokenizer

from core import layout
from core.pretrained import minilm_path
from core.registry import RegistryError
from core.settings import Settings
from scorer import runtime
from scorer.runtime import encode_texts, encoder_key, head_queries, load_served_model
from tests.model_factory import SLICE, split, tiny_version
from trainer import export


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("shoprank_query_cache_lookups_total", {"result": result}) or 0.0


def test_query_embeddings_are_cached_least_recently_used_out_and_lookups_exported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_version(tmp_path, "a")
    monkeypatch.setattr(runtime, "QUERY_CACHE_SIZE", 2)
    model = load_served_model(tmp_path, "a", device="cpu")  # its warm-up encodes one text
    assert not {"velvet lamp", "brass kettle", "zinc harp"} & set(model.queries.rows)  # not shipped
    hits, misses = lookups("hit"), lookups("miss")
    first = model.encode(["velvet lamp", "brass kettle", "velvet lamp"])  # twice in a batch: encoded once
    assert (lookups("hit") - hits, lookups("miss") - misses) == (0, 2)
    assert np.array_equal(model.encode(["velvet lamp"]), first[:1])  # a hit: now the most recent
    model.encode(["zinc harp"])  # full: the least recently used ("brass kettle") goes
    assert (lookups("hit") - hits, lookups("miss") - misses) == (1, 3)
    model.encode(["velvet lamp", "brass kettle"])
    assert (lookups("hit") - hits, lookups("miss") - misses) == (2, 4)
    assert (model.cache_hits, model.cache_misses) == (2, 5)  # the warm-up's miss too


def test_a_version_ships_its_head_queries_embedded_and_a_scorer_does_not_encode_them(tmp_path: Path) -> None:
    tiny_version(tmp_path, "a")
    model = load_served_model(tmp_path, "a", device="cpu")
    texts = [r.query for r in split().train[:SLICE]]
    expected = head_queries(model.tokenizer, texts, Settings().model.shipped_queries)
    assert list(model.queries.rows) == expected and len(expected) > 100
    sample = [k for k in expected if k.isascii()][:40]
    fresh = encode_texts(model.encoder, model.tokenizer, sample)  # what a miss would compute
    shipped_rows = model.queries.emb[[model.queries.rows[k] for k in sample]]
    assert np.allclose(shipped_rows, fresh, atol=1e-5)
    shipped, misses = lookups("shipped"), lookups("miss")
    typed = [f" {k.upper()}  " for k in sample]  # as shoppers type them: the same encoder key
    assert np.array_equal(model.encode(typed), shipped_rows)
    assert (lookups("shipped") - shipped, lookups("miss") - misses) == (len(sample), 0)


def test_a_version_serves_an_int8_query_encoder_only_where_it_agrees_with_the_exported_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized by default (SHOPRANK_MODEL_QUERY_ENCODER_PRECISION), the agreement measured on the
    version's own queries in its manifest; refused below the floor, when the exported graph
    serves. Either way a text's embedding does not depend on the texts encoded with it."""
    v = tiny_version(tmp_path, "a")
    encoder = v.manifest["query_encoder"]
    assert encoder["precision"] == "int8"
    assert encoder["agreement"]["mean_cosine"] >= export.INT8_MIN_MEAN_COSINE
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(v.path / layout.QUERY_ENCODER)).graph.node}
    model = load_served_model(tmp_path, "a", device="cpu")
    texts = ["xbox 360", "call of duty modern warfare 3 hardened edition", "kinect"]
    together = encode_texts(model.encoder, model.tokenizer, texts)
    alone = np.concatenate([encode_texts(model.encoder, model.tokenizer, [t]) for t in texts])
    assert np.array_equal(together, alone)
    monkeypatch.setattr(export, "INT8_MIN_MEAN_COSINE", 1.01)  # no encoder agrees that well
    refused = tiny_version(tmp_path, "b").manifest["query_encoder"]
    assert refused["precision"] == "fp32" and refused["int8_refused"]["texts"] > 0
    graph = onnx.load(str(tmp_path / "b" / layout.QUERY_ENCODER))
    assert "MatMulInteger" not in {n.op_type for n in graph.graph.node}


def test_a_query_splits_into_the_same_tokens_as_its_encoder_key() -> None:
    model_tokenizer = Tokenizer.from_file(str(minilm_path() / layout.TOKENIZER))
    s = split()
    odd = {"\uff38\uff42\uff4f\uff58  One", "Pok\u00e9mon\tX", " call\u00a0of duty "}  # wide, accent, tab
    texts = sorted({r.query for r in (*s.train, *s.test)} | odd)
    keys = [encoder_key(model_tokenizer, t) for t in texts]
    assert len(set(keys)) < len(texts)  # spellings meet
    for text, key in zip(texts, keys, strict=True):
        assert model_tokenizer.encode(text).ids == model_tokenizer.encode(key).ids, text


def test_a_version_whose_query_table_was_altered_does_not_load(tmp_path: Path) -> None:
    version = tiny_version(tmp_path, "a")
    emb = np.load(version.path / layout.QUERY_EMB)
    emb[0, 0] += 1.0
    np.save(version.path / layout.QUERY_EMB, emb)
    with pytest.raises(RegistryError, match=layout.QUERY_EMB):
        load_served_model(tmp_path, "a", device="cpu")


def test_head_queries_are_the_most_frequent_encoder_keys_first() -> None:
    tokenizer = Tokenizer.from_file(str(minilm_path() / layout.TOKENIZER))
    typed = ["Halo 3", "halo  3", "wii fit", "zelda", "HALO 3", "Wii Fit", "", "   ", "zelda", "mario"]
    assert head_queries(tokenizer, typed, 10) == ["halo 3", "wii fit", "zelda", "mario"]
    assert head_queries(tokenizer, typed, 2) == ["halo 3", "wii fit"]  # ties keep first-seen order
    assert head_queries(tokenizer, typed, 0) == []
