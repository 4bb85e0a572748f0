"""The loaders on the real files under data/: checksums, row counts, joins, events, splits."""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from datetime import UTC
from pathlib import Path

import pytest

from core import events
from core.settings import Settings
from evaluation.splits import bestbuy_split, crowdflower_folds
from replay import bestbuy, crowdflower
from replay.to_events import Stream, bestbuy_replay

DATA = Settings().data_dir


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sums(path: Path) -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines())}


@pytest.mark.parametrize("folder", ["bestbuy", "crowdflower"])
def test_copied_files_match_their_checksums_and_the_upstream_ones(folder: str) -> None:
    root = DATA / folder
    for name, digest in sums(root / "SHA256SUMS").items():
        assert sha256((root / name).read_bytes()) == digest, name
    for name, digest in sums(root / "SHA256SUMS.upstream").items():
        copy = root / name if (root / name).exists() else root / f"{name}.gz"
        data = copy.read_bytes()
        assert sha256(gzip.decompress(data) if copy.suffix == ".gz" else data) == digest, name


@pytest.fixture(scope="module")
def catalog() -> dict[str, bestbuy.Product]:
    return bestbuy.load_catalog(DATA)


@pytest.fixture(scope="module")
def clicks() -> list[bestbuy.ClickRow]:
    return bestbuy.load_clicks(DATA)


def test_bestbuy_catalog(catalog: dict[str, bestbuy.Product]) -> None:
    assert len(catalog) == 437  # 874 <product> entries, each sku twice
    p = catalog["1004622"]
    assert p.name == "Sniper: Ghost Warrior - Xbox 360"
    assert p.category_path == ("Best Buy", "Video Games", "Xbox 360", "Xbox 360 Games")
    assert p.manufacturer == "City Interactive"
    assert (p.regular_price, p.sale_price, p.price) == (19.99, 19.99, 19.99)
    assert (p.review_count, p.review_average) == (7, 3.4)
    assert str(p.release_date) == "2010-07-01"
    assert all(q.name and q.category_path for q in catalog.values())


def test_bestbuy_clicks_and_searches(
    clicks: list[bestbuy.ClickRow], catalog: dict[str, bestbuy.Product]
) -> None:
    searches = bestbuy.load_searches(DATA)
    assert len(clicks) == 42_365
    assert len(searches) == 28_241
    assert sum(c.sku in catalog for c in clicks) == 42_066  # 99.3% join to a catalog product
    assert all(c.query_time.tzinfo is UTC and c.click_time >= c.query_time for c in clicks)
    assert len({c.click_id for c in clicks}) == len(clicks)
    assert clicks[0].query_id == bestbuy.query_id(clicks[0].user_id, clicks[0].query_time, clicks[0].query)
    # several clicks on one search share its query id; some unlabeled searches are the same searches
    clicked_queries = {c.query_id for c in clicks}
    assert len(clicked_queries) == 40_386
    assert sum(s.query_id in clicked_queries for s in searches) == 2_582


def test_bestbuy_events_join_and_validate() -> None:
    replay = bestbuy_replay(DATA)
    kinds = Counter(e.stream for e in replay.events)
    assert len(replay.catalog) == 437
    assert kinds[Stream.INTERACTIONS] == 42_365
    assert kinds[Stream.QUERIES] == 65_354  # distinct searches of both files
    query_times = {e.event_id: e.timestamp for e in replay.events if e.stream is Stream.QUERIES}
    clicks = [e.event for e in replay.events if isinstance(e.event, events.Click)]
    assert all(c.query_id in query_times for c in clicks)  # every click joins to its query
    assert all(query_times[c.query_id] <= c.timestamp for c in clicks)  # which came first
    assert sum(c.price is None for c in clicks) == 42_365 - 42_066  # no catalog price to give
    times = [e.timestamp for e in replay.events]
    assert times == sorted(times)
    for e in [*replay.catalog, *replay.events]:  # every event satisfies the contract
        assert events.ANY.decode(events.encode(e.event)) == e.event


def test_crowdflower_judgements_and_folds() -> None:
    rows = crowdflower.load_judgements(DATA)
    assert len(rows) == 10_158
    assert len({r.id for r in rows}) == len(rows)
    assert len({r.query for r in rows}) == 261
    assert Counter(r.median_relevance for r in rows) == {4: 6171, 3: 1737, 2: 1476, 1: 774}
    assert sorted(Counter(r.fold for r in rows)) == list(range(1, 11))
    assert sum(not r.product_description for r in rows) == 2_444


def test_bestbuy_time_split() -> None:
    split = bestbuy_split(DATA)
    assert len(split.test) == round(42_365 * 0.2) == 8_473
    assert len(split.train) + len(split.late) + len(split.test) == 42_365
    assert max(r.query_time for r in split.train) <= split.cutoff == split.test[0].query_time
    assert all(r.click_time <= split.cutoff for r in split.train)
    test_times = [r.query_time for r in split.test]
    assert test_times == sorted(test_times)
    assert sum(r.product_id not in split.catalog for r in split.test) == 65  # misses stay in


def test_crowdflower_folds_partition_the_judgements() -> None:
    folds = crowdflower_folds(DATA)
    assert len(folds) == 10
    assert sum(len(f.candidates) for f in folds) == 10_158
    for f in folds:
        assert len(f.train) + len(f.candidates) == 10_158
        assert f.mask.sum(axis=0).tolist() == [1] * len(f.candidates)  # each product judged for one query
        assert {c.product_id for c in f.candidates}.isdisjoint(f.train_catalog)
