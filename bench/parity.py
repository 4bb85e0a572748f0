"""Where the offline harness and the running engine part, measured offline, one cause at a time.

The offline harness (``shoprank train``'s figure) scores each Best Buy test click through the
served version's ONNX graphs, fed by ``features.read`` from an in-memory store that has seen the
training period's clicks and queries and, before each test search, every click that had happened
by then. A replay through the running engine differs in what reaches the store and when. Here
the harness's walk is redone with the same graphs and the same read path, with each difference
switched on alone:

- ``unlabeled``: the searches whose clicked product the dataset withholds (28,241 rows of the
  Kaggle test file, 52k+13k searches in all with the click rows') are published as searches
  without clicks, so shoppers' search counts and last-seen times move;
- ``impressions``: each ranked test list (the whole catalog) is counted as impressions, as the
  feature workers count results (item impressions and click-through move; a version trained on
  the Best Buy log, which has no impressions, never saw them vary); ``impressions_all``: the
  training period's searches too (as when it is replayed through the engine);
- ``lag``: a search sees only the clicks that happened before the *previous* search (a replay
  step that publishes a search before the clicks that preceded it);
- ``speller``: the respelling dictionary read as of ``--speller-every`` searches ago (a scorer
  reloads it every ``spelling_refresh_s`` of wall time; replayed at ~30 searches/s, its default
  60 s is ~1,800 searches, more than a simulated day);
- ``own_query``: each search read *after* the feature workers applied it (its shopper's search
  count and last-seen time include it): the scorer and the feature workers consume the same query
  event at once, so the scorer may read either state;
- ``batch``: searches read in micro-batches of ``--batch`` consecutive searches, every one at the
  batch's latest query time and before the batch's searches are applied (the scorer's read time).

``python -m bench.parity`` prints MAP@5, NDCG@10 and MRR per variant; ``harness`` (all off) must
reproduce the version's offline figure (it is the harness's walk), which checks the emulation.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from core.events import RankedProduct, RankedResult
from core.registry import load_version, serving_version
from core.settings import ROOT, Settings
from evaluation.loop import ServedClick, summary
from evaluation.splits import BestBuySplit, bestbuy_split
from features.memory import MemoryStore
from features.read import Request, read_batch
from features.speller import Speller
from replay import bestbuy
from scorer.runtime import Batch, ServedModel
from trainer.examples import click_event, history, query_event, timeline

VARIANTS = ("harness", "unlabeled", "impressions", "impressions_all", "lag", "speller", "batch", "own_query",
            "all")


@dataclass(frozen=True)
class Search:
    query_id: str
    user_id: str
    text: str
    at: datetime
    clicks: tuple  # SearchRow of each click (empty: a search without a known click)


class StaleSpeller:
    """A store whose respelling dictionary is a copy refreshed every ``every`` searches."""

    def __init__(self, store: MemoryStore, every: int) -> None:
        self._store, self._every, self._n = store, every, 0
        self._copy = self._snapshot()

    def _snapshot(self) -> Speller:
        live = self._store.speller()
        return Speller.of(dict(live._clicks), live.min_clicks)  # a copy, read only

    def tick(self) -> None:
        self._n += 1
        if self._n % self._every == 0:
            self._copy = self._snapshot()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def speller(self) -> Speller:
        return self._copy


def searches_of(split: BestBuySplit, data_dir: Path, unlabeled: bool) -> tuple[list[Search], list[Search]]:
    """Training-period and test-period searches in (time, id) order."""
    groups: dict[str, list] = defaultdict(list)
    for r in [*split.train, *split.late, *split.test]:
        groups[r.query_id].append(r)
    out = {qid: Search(qid, rows[0].user_id or "anonymous", rows[0].query, rows[0].query_time, tuple(rows))
           for qid, rows in groups.items()}
    if unlabeled:
        for s in bestbuy.load_searches(data_dir):
            out.setdefault(s.query_id, Search(s.query_id, s.user_id, s.query, s.query_time, ()))
    ordered = sorted(out.values(), key=lambda s: (s.at, s.query_id))
    test_ids = {r.query_id for r in split.test}
    first_test = min(s.at for s in ordered if s.query_id in test_ids)
    return [s for s in ordered if s.at < first_test], [s for s in ordered if s.at >= first_test]


def run_variant(name: str, model: ServedModel, split: BestBuySplit, settings: Settings, data_dir: Path,
                speller_every: int, batch: int) -> dict[str, object]:
    started = time.monotonic()
    positions, n_test = walk(name, model, split, settings, data_dir, speller_every, batch)
    clicks = [ServedClick(r.query_id, r.query_time.date().isoformat(),
                          positions.get(r.query_id, {}).get(r.product_id or ""))
              for r in split.test]
    out = summary(clicks)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["test_searches"] = n_test
    return out


def harness_positions(settings: Settings, version: str, split: BestBuySplit,
                      wanted: set[str]) -> dict[str, dict[str, int]]:
    """The served position of every product for each test search of ``wanted`` as the offline
    harness ranks it (every difference off)."""
    model = ServedModel(load_version(settings.model.registry_dir, version), device="cpu")
    positions, _ = walk("harness", model, split, settings, settings.data_dir, 1, 1, wanted)
    return positions


def walk(name: str, model: ServedModel, split: BestBuySplit, settings: Settings, data_dir: Path,
         speller_every: int, batch: int, wanted: set[str] | None = None
         ) -> tuple[dict[str, dict[str, int]], int]:
    """The harness's walk with variant ``name``: each test search's served positions (up to the
    last of ``wanted`` when given), and how many test searches were ranked."""
    on = {v: name in (v, "all") for v in VARIANTS if v != "own_query"} | {"own_query": name == "own_query"}
    on["impressions"] = on["impressions"] or on["impressions_all"]
    store = MemoryStore(settings.features)
    for p in split.catalog.values():
        store.apply(p)
    train, test = searches_of(split, data_dir, on["unlabeled"])
    # The training period exactly as train_run built its store (its searches' clicks and queries
    # in event time), plus the searches without a known click when asked.
    everything = [RankedProduct(product_id=p, score=0.0, position=i) for i, p in enumerate(split.catalog, 1)]
    past = list(timeline(split.train))
    if on["unlabeled"]:  # the searches without a known click, in event time among the others
        timed = [(_t(kind, payload), n, kind, payload) for n, (kind, payload) in enumerate(past)]
        timed += [(s.at, len(timed) + n, "search", [_row(s)]) for n, s in enumerate(train) if not s.clicks]
        past = [(kind, payload) for _, _, kind, payload in sorted(timed, key=lambda x: (x[0], x[1]))]
    for kind, payload in past:
        if kind == "click":
            store.apply(click_event(payload))  # type: ignore[arg-type]
        else:
            first = payload[0]  # type: ignore[index]
            if on["impressions_all"]:  # shown the whole catalog (the order does not change the counts)
                store.apply(RankedResult(query_id=first.query_id, user_id=first.user_id or "anonymous",
                                         session_id="-", model_version="-", products=everything,
                                         timestamp=first.query_time))
            store.apply(query_event(first))
    reader = StaleSpeller(store, speller_every) if on["speller"] else store
    ids = list(split.catalog)
    rows = model.rows(ids)
    pending: list[tuple[datetime, int, object]] = [(r.click_time, i, r) for i, r in enumerate(split.late)]
    heapq.heapify(pending)
    seq = len(pending)
    positions: dict[str, dict[str, int]] = {}
    step = batch if on["batch"] else 1
    previous_at: datetime | None = None
    if wanted is not None:
        last = max((i for i, s in enumerate(test) if s.query_id in wanted), default=-1)
        test = test[:last + 1]
    for start in range(0, len(test), step):
        group = test[start:start + step]
        until = previous_at if on["lag"] and previous_at is not None else group[0].at
        while pending and pending[0][0] <= until:
            store.apply(click_event(heapq.heappop(pending)[2]))  # type: ignore[arg-type]
        if on["own_query"]:
            for s in group:
                store.apply(query_event(_row(s)))
        now = max(s.at for s in group).timestamp()
        feats = read_batch(reader, [Request.for_text(s.user_id, s.text, ids) for s in group], now)  # type: ignore[arg-type]
        for s, f in zip(group, feats, strict=True):
            hist_idx, hist_w = history(f.recent_products, f.recent_weights, model.product_index,
                                       model.unknown_row, model.history_len)
            b = Batch(query_emb=model.encode([s.text]), cand_idx=rows[None, :], hist_idx=hist_idx[None, :],
                      hist_w=hist_w[None, :], dense=f.features[None, :, :], n_candidates=[len(ids)])
            order = np.argsort(-model.score(b)[0], kind="stable")
            positions[s.query_id] = {ids[j]: pos for pos, j in enumerate(order.tolist(), 1)}
            if on["impressions"]:
                ranked = [RankedProduct(product_id=ids[j], score=0.0, position=pos)
                          for pos, j in enumerate(order.tolist(), 1)]
                store.apply(RankedResult(query_id=s.query_id, user_id=s.user_id, session_id=s.user_id,
                                         model_version=model.version, products=ranked, timestamp=s.at))
            store.apply(query_event(_row(s)))
            for r in s.clicks:
                heapq.heappush(pending, (r.click_time, seq, r))
                seq += 1
            if isinstance(reader, StaleSpeller):
                reader.tick()
        previous_at = group[-1].at
    return positions, len(test)


def _t(kind: str, payload: object) -> datetime:
    return payload.click_time if kind == "click" else payload[0].query_time  # type: ignore[attr-defined,index]


def _row(s: Search):  # type: ignore[no-untyped-def]
    from evaluation.ranker import SearchRow

    return SearchRow(query_id=s.query_id, query=s.text, user_id=s.user_id, query_time=s.at)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="harness,unlabeled,impressions,lag,speller,batch",
                        help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--version", default=None, help="registry version (default: models/SERVING)")
    parser.add_argument("--speller-every", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "parity.json")
    args = parser.parse_args()
    settings = Settings()
    registry = settings.model.registry_dir
    version = load_version(registry, args.version or serving_version(registry) or "")
    model = ServedModel(version, device="cpu")
    split = bestbuy_split(settings.data_dir)
    print(f"version {version.version}: offline {version.manifest.get('metrics', {})}", flush=True)
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, model, split, settings, settings.data_dir, args.speller_every,
                                    args.batch)
        shown = {k: v for k, v in results[name].items() if k != "per_day"}
        print(f"{name:12} {json.dumps(shown)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"version": version.version, "offline": version.manifest.get("metrics"),
                                    "variants": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
