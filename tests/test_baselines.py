"""Baselines and the harness on slices of the real data; the report; the pretrained files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from core.events import CatalogProduct
from core.pretrained import MINILM_SHA256, PretrainedModelError, minilm_path, verify_files
from core.settings import Settings
from core.text import normalize_query, words
from evaluation import baselines, report
from evaluation.commands import METHODS, methods
from evaluation.harness import Result, evaluate_bestbuy, evaluate_crowdflower
from evaluation.ranker import BaseRanker, Ranker, SearchRow
from evaluation.splits import BestBuySplit, bestbuy_split, crowdflower_folds

DATA = Settings().data_dir


@pytest.fixture(scope="module")
def small_split() -> BestBuySplit:
    """The last 12k training clicks and the first 1,500 test clicks."""
    full = bestbuy_split(DATA)
    return replace(full, train=full.train[-12_000:], test=full.test[:1_500])


def map5(ranker: Ranker, split: BestBuySplit) -> float:
    return evaluate_bestbuy(ranker, split).metrics["map@5"]


def test_query_table_beats_popularity_beats_random(small_split: BestBuySplit) -> None:
    random_ = map5(baselines.RandomRanker(), small_split)
    popular = map5(baselines.PopularRanker(), small_split)
    table = map5(baselines.QueryTableRanker(), small_split)
    online = map5(baselines.QueryTableRanker(online=True), small_split)
    assert random_ < popular < table
    assert popular > 2 * random_ and table > 0.5
    assert online >= table  # the test clicks it observed can only add evidence


def test_every_ranker_satisfies_the_protocol() -> None:
    assert set(methods()) == set(METHODS)
    for method in methods().values():
        assert isinstance(method.make(), Ranker)


class Spy(BaseRanker):
    """Records what it is shown, and fails the test on any look at the future."""

    name = "spy"
    online = True

    def __init__(self) -> None:
        self.observed: list[SearchRow] = []
        self.scored: list[SearchRow] = []
        self.scored_ids: set[str] = set()

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None:
        self.observed.extend(rows)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        first = queries[0].query_time
        assert first is not None
        assert all(q.product_id is None and q.click_time is None for q in queries)  # outcome stripped
        assert all(o.click_time is not None and o.click_time <= first for o in self.observed)
        self.scored.extend(queries)
        self.scored_ids.update(q.query_id for q in queries)
        return np.zeros((len(queries), len(candidates)))

    def observe(self, row: SearchRow) -> None:
        assert row.query_id in self.scored_ids  # a test click is observed only after it was scored
        assert row.product_id is not None and row.click_time is not None
        self.observed.append(row)


@pytest.mark.parametrize("batch_size", [1, 97])
def test_harness_is_point_in_time(small_split: BestBuySplit, batch_size: int) -> None:
    spy = Spy()
    evaluate_bestbuy(spy, small_split, batch_size=batch_size)
    times = [q.query_time for q in spy.scored]
    assert len(spy.scored) == len(small_split.test)
    assert times == sorted(times)  # scored in query time order
    observed = spy.observed[len(small_split.train):]
    assert 0 < len(observed) < len(small_split.test)  # clicks after the last query are never released
    assert [o.click_time for o in observed] == sorted(o.click_time for o in observed)  # type: ignore[type-var]


def test_a_ranker_returning_the_wrong_shape_is_rejected(small_split: BestBuySplit) -> None:
    class Wrong(BaseRanker):
        name = "wrong"

        def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
            return np.zeros((len(queries), len(candidates) - 1))

    with pytest.raises(ValueError, match="shape"):
        evaluate_bestbuy(Wrong(), small_split)


def test_bm25_beats_random_on_crowdflower() -> None:
    folds = crowdflower_folds(DATA)[:3]
    random_ = evaluate_crowdflower(baselines.RandomRanker, folds)
    bm25 = evaluate_crowdflower(baselines.BM25Ranker, folds)
    assert bm25.metrics["ndcg@10"] > random_.metrics["ndcg@10"] + 0.01
    assert set(bm25.spread) == set(bm25.metrics)


def test_minilm_ranks_the_matching_title_first() -> None:
    titles = ["Halo: Reach - Xbox 360", "FIFA Soccer 12 - Xbox 360", "Xbox 360 250GB Hard Drive"]
    candidates = [
        CatalogProduct(product_id=str(i), title=t, updated_at=datetime(2011, 8, 11, tzinfo=UTC))
        for i, t in enumerate(titles)
    ]
    queries = [SearchRow(query_id="a", query="halo"), SearchRow(query_id="b", query="soccer game"),
               SearchRow(query_id="c", query="hard drive storage")]
    scores = baselines.MiniLMRanker().score(queries, candidates)
    assert scores.shape == (3, 3)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]


def test_words() -> None:
    assert words("  Call of Duty: MW3! ") == ["call", "of", "duty", "mw3"]
    assert words("Assassin's Creed") == words("assassins creed")
    assert words("Spider-Man") == ["spider", "man"]
    assert words("\uff26\uff29\uff26\uff21\t12") == ["fifa", "12"]  # full-width letters


def test_normalize_query_gives_the_spellings_of_a_query_one_key() -> None:
    key = normalize_query("kinect xbox 360")
    for typed in ("xbox360 kinect", "Kinect for Xbox 360", "KINECTS, xbox 360!", "xbox 360 kinect xbox"):
        assert normalize_query(typed) == key, typed
    assert normalize_query("rock smith") == normalize_query("Rocksmith")
    assert normalize_query("Assassin's Creed") == normalize_query("assassins creed")
    assert normalize_query("\uff26\uff29\uff26\uff21\t12") == normalize_query("fifa 12")
    assert normalize_query("battlefield 3") != normalize_query("battlefield")
    assert normalize_query("bass guitar") != normalize_query("bas guitar")  # -ss is no plural
    assert normalize_query("the") == "the"  # only stopwords: kept
    assert normalize_query(" !! ") == ""
    assert not any(c.isspace() or c == ":" for c in normalize_query("Call of Duty: MW3"))  # Redis keys


def test_pretrained_files_are_verified(tmp_path: Path) -> None:
    assert (minilm_path() / "model.safetensors").is_file()
    small = {name: digest for name, digest in MINILM_SHA256.items() if name.endswith(".json")}
    for name in small:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(minilm_path() / name, tmp_path / name)
    verify_files(tmp_path, small)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PretrainedModelError, match=r"config\.json"):
        verify_files(tmp_path, small)
    (tmp_path / "modules.json").unlink()
    with pytest.raises(PretrainedModelError, match="missing"):
        verify_files(tmp_path, {"modules.json": small["modules.json"]})


def test_report_merges_by_method_and_dataset(tmp_path: Path) -> None:
    path = tmp_path / "quality.json"
    a = Result("a", "bestbuy", {"map@5": 0.1}, 10, "p", 1.0)
    b = Result("b", "bestbuy", {"map@5": 0.2}, 10, "p", 1.0)
    report.write_rows([a, b], path)
    report.write_rows([replace(a, metrics={"map@5": 0.3})], path)
    entries = json.loads(path.read_text())["entries"]
    assert {(e["method"], e["metrics"]["map@5"]) for e in entries} == {("a", 0.3), ("b", 0.2)}
    cf = Result("c", "crowdflower", {"map@5": 0.5}, 10, "p", 1.0, spread={"map@5": 0.01})
    table = report.markdown_table(report.write_rows([cf], path))
    assert "| crowdflower | c | 0.5000 ± 0.0100 |" in table
    assert table.count("\n") == 4  # header, rule, three rows
