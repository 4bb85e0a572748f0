"""The trainer: listwise loss, point-in-time lists, export agreement, atomic model versions."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from core.registry import RegistryError, load_version, publish_version, serving_version, set_serving
from core.settings import FeatureSettings, ModelSettings, Settings
from core.text import normalize_query
from evaluation.ranker import SearchRow
from features.memory import MemoryStore
from features.read import FEATURE_NAMES, INDEX, Request, read_batch
from replay import bestbuy
from replay.to_events import timeline
from scorer.runtime import load_served_model
from tests.model_factory import SLICE, split, tiny_run, tiny_version
from trainer import bert_ranker, examples
from trainer.bert_ranker import PersonalizedBertRanker
from trainer.examples import REFIT, TRAIN, VALIDATE, Catalog, ListBuilder, build_lists
from trainer.export import export_onnx, max_abs_difference
from trainer.fit import Examples, grouped_order
from trainer.losses import listwise_softmax_loss


def test_listwise_loss_matches_cross_entropy_for_one_relevant_item() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    gains = torch.tensor([[0.0, 1.0, 0.0]])
    expected = -torch.log_softmax(scores, -1)[0, 1]
    assert torch.isclose(listwise_softmax_loss(scores, gains), expected)


def test_listwise_loss_ignores_padding_and_lists_without_gain() -> None:
    scores = torch.tensor([[5.0, 1.0, 9.0], [1.0, 2.0, 3.0]])
    gains = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    expected = -torch.log_softmax(torch.tensor([5.0, 1.0]), -1)[1]
    assert torch.isclose(listwise_softmax_loss(scores, gains, valid), expected)


def test_grouped_order_is_a_permutation_keeping_texts_together() -> None:
    text_id = np.array([3, 1, 3, 2, 1, 3, 2])
    order = grouped_order(text_id, np.random.default_rng(0))
    assert sorted(order) == list(range(len(text_id)))
    runs = [t for i, t in enumerate(text_id[order]) if i == 0 or t != text_id[order][i - 1]]
    assert len(runs) == len(set(text_id))


def lists_of(rows: list[SearchRow], full_from: datetime | None = None,
             features: FeatureSettings | None = None) -> tuple[Examples, np.ndarray]:
    """Lists of 16 over the Best Buy catalog, random product and query vectors."""
    ids = list(split().catalog)
    rng = np.random.default_rng(0)
    catalog = Catalog(ids, rng.normal(size=(len(ids), 8)).astype(np.float32))
    texts = {normalize_query(r.query) for r in rows}
    vectors = {t: rng.normal(size=8).astype(np.float32) for t in texts}
    store = MemoryStore(features or FeatureSettings())  # the stores take no default
    for product in split().catalog.values():
        store.apply(product)
    return build_lists(rows, store, ListBuilder(catalog, vectors, 16, 4, 0), full_from=full_from,
                       progress=False)


def test_training_lists_are_point_in_time() -> None:
    """A search's features are read before it and its clicks are applied: the very first search
    has no evidence at all, and a repeated search sees exactly the clicks that came before it.
    (Respelling off: otherwise a new query also sees the earlier clicks of its respelling.)"""
    rows = split().train[:400]
    ids = list(split().catalog)
    lists, roles = lists_of(rows, features=FeatureSettings(spelling_min_clicks=0))
    assert (roles == TRAIN).all() and len(lists) == len({r.query_id for r in rows})
    evidence = [INDEX[n] for n in ("item_clicks_log", "query_item_clicks_log", "user_has_history")]
    assert not lists.dense[0][:, evidence].any()
    first_search: dict[str, SearchRow] = {}
    for r in rows:
        first_search.setdefault(r.query_id, r)
    searches = sorted(first_search.values(), key=lambda r: r.query_time)
    for i, search in enumerate(searches):
        text = normalize_query(search.query)
        seen = {c.product_id for c in rows
                if normalize_query(c.query) == text and c.click_time < search.query_time}
        for j in np.flatnonzero(lists.valid[i]):
            pid = ids[lists.cand_idx[i, j]]
            assert (lists.dense[i, j, INDEX["query_item_clicks_log"]] > 0) == (pid in seen), (i, pid)


def test_training_replays_the_events_the_replay_publishes() -> None:
    # One conversion: a click has the same id (and so the same dedup marker) in training as on
    # the interactions topic; the trainer's click carries no price (training reads none).
    data = Settings().data_dir
    replayed = timeline(bestbuy.load_catalog(data), bestbuy.load_clicks(data), [])
    published = {e.event_id: e.event for e in replayed}
    for row in split().train[:500]:
        click = examples.click_event(row)
        assert msgspec.structs.replace(published[click.event_id], price=None) == click  # type: ignore[type-var]
        assert published[row.query_id] == examples.query_event(row.as_query())


def test_each_validation_search_also_gives_its_training_list_for_the_refit() -> None:
    rows = split().train[:400]
    ids = list(split().catalog)
    lists, roles = lists_of(rows, full_from=sorted(r.query_time for r in rows)[200])
    validate, refit = np.flatnonzero(roles == VALIDATE), np.flatnonzero(roles == REFIT)
    assert len(validate) == len(refit) > 0 and (refit == validate + 1).all()
    for v, r in zip(validate, refit, strict=True):
        assert lists.valid[v].sum() == len(ids) and 0 < lists.valid[r].sum() <= 16
        assert lists.text_id[v] == lists.text_id[r]
        cands = lists.cand_idx[r][lists.valid[r]]
        np.testing.assert_array_equal(lists.dense[r][lists.valid[r]], lists.dense[v][cands])
        assert lists.grades[r].sum() == lists.grades[v].sum()  # the same clicks


def test_features_are_live_in_the_training_store() -> None:
    """Clicks joined the catalog and their queries: query-product evidence exists."""
    run = tiny_run()
    row = split().train[SLICE - 1]
    result = read_batch(run.store, [Request(row.user_id or "", normalize_query(row.query),
                                            list(split().catalog))], row.query_time.timestamp() + 1)[0]
    assert result.features.shape == (len(split().catalog), len(FEATURE_NAMES))
    assert result.features[:, INDEX["item_clicks_log"]].max() > 0
    assert result.features[:, INDEX["query_item_clicks_log"]].max() > 0


def test_torch_and_onnxruntime_agree(tmp_path: Path) -> None:
    # The exported graphs, before a version may swap its query encoder for int8 (whose own
    # agreement test is in test_query_cache): the same numbers as torch, to float rounding.
    export_onnx(tiny_run().model, tmp_path)
    diff = max_abs_difference(tiny_run().model, tmp_path, batch=4, length=9, candidates=13, history=5)
    assert diff < 1e-4


def test_a_version_is_complete_and_hash_checked(tmp_path: Path) -> None:
    version = tiny_version(tmp_path, "v1")
    manifest = version.manifest
    assert set(manifest["files"]) >= {"query_encoder.onnx", "ranker_head.onnx", "product_emb.npy",
                                      "product_ids.json", "tokenizer.json", "weights.pt"}
    assert manifest["config"]["feature_names"] == list(FEATURE_NAMES)
    assert manifest["data_window"]["rows"] == SLICE
    served = load_served_model(tmp_path, "v1", device="cpu")
    assert served.version == "v1" and served.device == "cpu"

    with (version.path / "product_ids.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(RegistryError, match=r"product_ids\.json"):
        load_version(tmp_path, "v1")


def test_a_failed_write_leaves_no_version(tmp_path: Path) -> None:
    def write(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_version(tmp_path, "broken", {}, write)
    assert list(tmp_path.iterdir()) == []


def test_serving_points_only_at_complete_versions(tmp_path: Path) -> None:
    tiny_version(tmp_path, "v1")
    set_serving(tmp_path, "v1")
    assert serving_version(tmp_path) == "v1"
    with pytest.raises(RegistryError):
        set_serving(tmp_path, "missing")
    assert serving_version(tmp_path) == "v1"
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["version"] == "v1"


def test_a_feature_constant_in_training_cannot_move_scores() -> None:
    """Best Buy has no impressions: impression counts in production must not change a ranking."""
    model = tiny_run().model.eval()
    assert model.head.keep[INDEX["item_impressions_log"]] == 0
    dense = torch.zeros(1, 3, len(FEATURE_NAMES))
    emb = torch.nn.functional.normalize(torch.randn(1, 3, model.cfg.dim), dim=-1)
    args = (torch.nn.functional.normalize(torch.randn(1, model.cfg.dim), dim=-1), emb,
            emb[:, :1], torch.ones(1, 1))
    with torch.no_grad():
        before = model.rank(*args, dense)
        dense[0, :, INDEX["item_impressions_log"]] = torch.tensor([0.0, 5.0, 50.0])
        after = model.rank(*args, dense)
    assert torch.allclose(before, after)


def test_a_worse_version_is_not_served_unless_the_serving_one_cannot_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = PersonalizedBertRanker(Settings(model=ModelSettings(registry_dir=tmp_path)), progress=False)
    ranker.run = tiny_run()
    ranker.promote({"map@5": 0.6}, name="good")
    assert serving_version(tmp_path) == "good"
    ranker.promote({"map@5": 0.5}, name="worse")
    assert serving_version(tmp_path) == "good"
    # This code now reads one more feature than the serving version was trained on: the scorer
    # would refuse that version, so it is no reason to keep a servable one out.
    monkeypatch.setattr(bert_ranker, "FEATURE_NAMES", (*FEATURE_NAMES, "a_new_feature"))
    ranker.promote({"map@5": 0.5}, name="servable")
    assert serving_version(tmp_path) == "servable"
