"""``shoprank train``: fine-tune, evaluate, publish and announce a ranker version.

One run: train on the Best Buy training period, evaluate on its test period through the served
path (onnxruntime + features.read), publish the version with its metrics, serve it unless it is
worse than the version serving now, and announce it on the model-updates topic so every scorer
hot-swaps. ``--ablation`` adds the same model without shopper features; ``--crowdflower`` the
fine-tuned text model's 10-fold cross-validation. Every figure lands in bench/results/quality.json.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from core.settings import Settings


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from core.registry import serving_version
    from evaluation import report
    from evaluation.harness import Result, evaluate_bestbuy
    from evaluation.splits import bestbuy_split
    from trainer.bert_ranker import PersonalizedBertRanker

    registry = settings.model.registry_dir
    if args.if_missing and (current := serving_version(registry)):
        print(f"model {current} is serving (in {registry}): not training")
        return 0
    split = bestbuy_split(settings.data_dir)
    results: list[Result] = []

    def record(result: Result) -> None:  # each row lands as soon as it is measured
        results.append(result)
        report.write_rows([result])

    ranker = PersonalizedBertRanker(settings, personalized=True, progress=not args.quiet)
    record(evaluate_bestbuy(ranker, split))
    version = ranker.promote(results[-1].metrics)
    if args.ablation:
        no_user = PersonalizedBertRanker(settings, personalized=False, progress=not args.quiet)
        record(evaluate_bestbuy(no_user, split))
    if args.crowdflower:
        record(_crowdflower(settings))
    print(report.markdown_table(report.entry(r) for r in results))
    if version is not None:
        serving = serving_version(registry)
        print(f"\nmodel version {version.version} written to {version.path}; serving: {serving}")
        if not args.no_announce and serving == version.version:
            announce(settings, version)
    return 0


def _crowdflower(settings: Settings):  # type: ignore[no-untyped-def]
    from evaluation.harness import evaluate_crowdflower
    from evaluation.splits import crowdflower_folds
    from trainer.text_ranker import FineTunedTextRanker, ProductVectors

    vectors = ProductVectors()
    return evaluate_crowdflower(lambda: FineTunedTextRanker(vectors), crowdflower_folds(settings.data_dir))


def announce(settings: Settings, version) -> None:  # type: ignore[no-untyped-def]
    """Publish a ModelUpdate so every running scorer loads, checks and swaps to ``version``."""
    from core import kafka
    from core.events import ModelUpdate, encode

    update = ModelUpdate(model_version=version.version, parent_version=version.manifest.get("parent_version"),
                         uri=str(version.path), manifest_sha256=version.manifest_sha256,
                         metrics={k: float(v) for k, v in version.manifest.get("metrics", {}).items()},
                         created_at=datetime.now(UTC))
    kafka.send_acked(kafka.producer(settings), settings.topics.model_updates,
                     [(b"model", encode(update), None)])
    print(f"announced {version.version} on {settings.topics.model_updates}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune, evaluate, publish and announce a ranker version")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a version is serving already")
    p.add_argument("--ablation", action="store_true", help="also evaluate the model without shopper features")
    p.add_argument("--crowdflower", action="store_true", help="also cross-validate the fine-tuned text model")
    p.add_argument("--no-announce", action="store_true", help="do not publish the model update to Kafka")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
