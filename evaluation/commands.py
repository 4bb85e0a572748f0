"""``shoprank eval``: measure the baselines on the real data and report them (``make eval``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Settings

if TYPE_CHECKING:
    from evaluation.ranker import Ranker

DATASETS = ("bestbuy", "crowdflower")
METHODS = ("random", "popular", "popular_decayed", "query_table", "query_table_online", "bm25", "minilm")


@dataclass(frozen=True)
class Method:
    make: Callable[[], Ranker]
    datasets: tuple[str, ...]


def methods() -> dict[str, Method]:
    """Every baseline, and the datasets it applies to (CrowdFlower has no clicks to count)."""
    from evaluation import baselines as b

    both, clicks = DATASETS, ("bestbuy",)
    return {
        "random": Method(b.RandomRanker, both),
        "popular": Method(b.PopularRanker, clicks),
        "popular_decayed": Method(lambda: b.PopularRanker(half_life_days=7.0, online=True), clicks),
        "query_table": Method(b.QueryTableRanker, clicks),
        "query_table_online": Method(lambda: b.QueryTableRanker(online=True), clicks),
        "bm25": Method(b.BM25Ranker, both),
        "minilm": Method(b.MiniLMRanker, both),
    }


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from evaluation import report
    from evaluation.harness import Result, evaluate_bestbuy, evaluate_crowdflower
    from evaluation.splits import bestbuy_split, crowdflower_folds

    chosen = [m for name, m in methods().items() if name in args.methods]
    results: list[Result] = []
    if "bestbuy" in args.datasets:
        split = bestbuy_split(settings.data_dir)
        results += [evaluate_bestbuy(m.make(), split) for m in chosen if "bestbuy" in m.datasets]
    if "crowdflower" in args.datasets:
        folds = crowdflower_folds(settings.data_dir)
        results += [evaluate_crowdflower(m.make, folds) for m in chosen if "crowdflower" in m.datasets]
    print(report.markdown_table(report.entry(r) for r in results))
    if not args.no_write:
        output = args.output or report.QUALITY_JSON
        entries = report.write_rows(results, output)
        print(f"\nmerged {len(results)} rows into {output} ({len(entries)} entries)")
    return 0


def _choice_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if unknown := sorted(set(names) - set(allowed)):
            choices = ", ".join(allowed)
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {choices}")
        return names

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure ranking quality on the real data (MAP@5, NDCG@10, MRR, recall)")
    p.add_argument("--methods", type=_choice_list(METHODS), default=list(METHODS),
                   help=f"comma-separated, from: {','.join(METHODS)} (default: all)")
    p.add_argument("--datasets", type=_choice_list(DATASETS), default=list(DATASETS),
                   help=f"comma-separated, from: {','.join(DATASETS)} (default: both)")
    p.add_argument("--output", type=Path, default=None,
                   help="the JSON to merge results into (default: bench/results/quality.json)")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    p.set_defaults(func=cmd_eval)
