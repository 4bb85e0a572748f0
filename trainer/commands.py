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
    from core.registry import uri
    from core.topics import route
    from scorer.embedder import embed_live_catalog

    embed_live_catalog(settings, version)  # the live catalog's vectors for its tower, before it serves
    # A reference, not a path: every scorer finds the version under its own registry_dir setting.
    update = ModelUpdate(model_version=version.version, parent_version=version.manifest.get("parent_version"),
                         uri=uri(version.version), manifest_sha256=version.manifest_sha256,
                         metrics={k: float(v) for k, v in version.manifest.get("metrics", {}).items()},
                         created_at=datetime.now(UTC))
    topic, key = route(settings, update)
    kafka.send_acked(kafka.producer(settings), topic, [(key.encode(), encode(update), None)])
    print(f"announced {version.version} on {topic}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune, evaluate, publish and announce a ranker version")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a version is serving already")
    p.add_argument("--ablation", action="store_true", help="also evaluate the model without shopper features")
    p.add_argument("--crowdflower", action="store_true", help="also cross-validate the fine-tuned text model")
    p.add_argument("--no-announce", action="store_true", help="do not publish the model update to Kafka")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    _register_continuous(sub)


# --- the continuous trainer and the registry's versions (trainer/continuous.py) -------------------


def cmd_trainer(args: argparse.Namespace, settings: Settings) -> int:
    """``shoprank trainer``: the service, or ``--once``: one cycle, exit code = its outcome
    (0 promoted, 3 rejected, 4 nothing to do, 5 another trainer holds the lease)."""
    from trainer.continuous import run_once, serve

    if not args.once:
        return serve(settings)
    report = run_once(settings, wait_s=args.wait)
    where = f" {report.version}" if report.version else ""
    print(f"{report.outcome.name.lower()}{where}: {report.reason} ({report.seconds:.1f} s)")
    return int(report.outcome)


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from core import registry as reg

    registry = settings.model.registry_dir
    entries = reg.history(registry)
    status = reg.statuses(registry, entries)
    why = {}
    for e in entries:  # the latest reason given for each version
        if e.get("reason"):
            why[e["version"]] = e["reason"]
    rows = []
    for name in reg.list_versions(registry):
        try:
            manifest = json.loads((registry / name / reg.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            manifest = {"error": str(exc)}
        metrics = manifest.get("metrics", {})
        rows.append({"version": name, "status": status.get(name, "?"),
                     "created_at": manifest.get("created_at"), "parent": manifest.get("parent_version"),
                     "trained_by": manifest.get("trained_by", "train"), "metrics": metrics,
                     "gate": (manifest.get("gate") or {}).get("decision"), "reason": why.get(name),
                     "lineage": reg.lineage(registry, name)})
    rows.sort(key=lambda r: r["created_at"] or "")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':30} {'status':12} {'created':20} {'parent':30} {'map@5':>7} {'Δ holdout':>9}  reason")
    for r in rows:
        m = r["metrics"]
        figure, diff = m.get("holdout_map@5", m.get("map@5")), m.get("holdout_map@5_diff")
        shown = "-" if figure is None else f"{figure:.4f}"
        shown_diff = "-" if diff is None else f"{diff:+.4f}"
        print(f"{r['version']:30} {r['status']:12} {(r['created_at'] or '')[:19]:20} "
              f"{r['parent'] or '-':30} {shown:>7} {shown_diff:>9}  {r['reason'] or ''}")
    kinds = ("serving", "promoted", "rejected", "rolled back")
    counts = {k: sum(r["status"] == k for r in rows) for k in kinds}
    print(f"\n{len(rows)} versions in {registry}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def cmd_model_rollback(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from core.registry import RegistryError
    from features.redis_store import connect
    from trainer.continuous import rollback
    from trainer.lease import Lease, LeaseHeld

    lease = Lease(connect(settings.redis), settings.trainer.lease_ttl_s)
    reason = args.reason or f"manual rollback by {getpass.getuser()}"
    try:
        with lease.held(wait_s=args.wait):
            before, after = rollback(settings, args.version, reason, by="cli")
    except LeaseHeld as exc:
        print(f"not rolled back: {exc} (a trainer cycle takes at most about max_cycle_s; --wait longer)")
        return 5
    except RegistryError as exc:
        print(f"not rolled back: {exc}")
        return 1
    print(f"rolled back {before} -> {after}: {reason}")
    return 0


def _register_continuous(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer", help="keep fine-tuning on labeled lists; gate, promote, roll back")
    p.add_argument("--once", action="store_true",
                   help="one cycle now, then exit: 0 promoted, 3 rejected, 4 nothing to do, 5 lease held")
    p.add_argument("--wait", type=float, default=0.0, help="with --once: seconds to wait for the lease")
    p.set_defaults(func=cmd_trainer)
    model = sub.add_parser("model", help="the registry's versions: list, rollback, init (zero-shot)")
    verbs = model.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("list", help="versions, lineage, metrics, status (serving, promoted, rejected...)")
    p.add_argument("--json", action="store_true", help="machine-readable, with each version's lineage")
    p.set_defaults(func=cmd_model_list)
    p = verbs.add_parser("rollback", help="serve an earlier version (default: the one before), announce it")
    p.add_argument("version", nargs="?", help="the version to serve (default: the previous serving one)")
    p.add_argument("--reason", help="why (recorded in the registry log)")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for a running trainer's lease")
    p.set_defaults(func=cmd_model_rollback)
    p = verbs.add_parser("init", help="a zero-shot version for a shop with no data yet: rank by text match "
                                      "(pretrained encoder, head output zeroed), serve and announce it")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a version is serving already")
    p.add_argument("--no-announce", action="store_true", help="do not publish the model update to Kafka")
    p.set_defaults(func=cmd_model_init)


def cmd_model_init(args: argparse.Namespace, settings: Settings) -> int:
    from core.registry import serving_version, set_serving
    from scorer.embedder import embed_live_catalog
    from trainer.zero_shot import zero_shot_version

    registry = settings.model.registry_dir
    if args.if_missing and (current := serving_version(registry)):
        print(f"model {current} is serving (in {registry}): no zero-shot version needed")
        return 0
    version = zero_shot_version(registry, features=settings.features)
    embed_live_catalog(settings, version)  # before it serves
    set_serving(registry, version.version, reason="zero-shot: ranks by text match until trained")
    print(f"zero-shot version {version.version} written to {version.path}; serving")
    if not args.no_announce:
        announce(settings, version)
    return 0
