"""``python -m bench.personal sim``: the shopper simulation through a live engine (SIMULATION).

Every :class:`sim.world.SimParams` field is an option (its default documented in ``--help``).
Writes bench/results/simulation.json and the ``sim_*`` keys of bench/results/personalization.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import ROOT, Settings
from sim import LABEL, TRAINER_EPOCHS
from sim.world import SimParams, SimSearch, World

if TYPE_CHECKING:  # imported where used: sim.live pulls the engine in
    from sim.live import LiveSim

RESULTS = ROOT / "bench" / "results"
HELP = {
    "shoppers": "simulated shoppers",
    "days": "simulated days",
    "seed": "random seed (everything)",
    "visits_per_day": "mean sessions per shopper per day (times the shopper's activity ~ Gamma(2, 0.5))",
    "searches_per_session": "mean searches per session (geometric, >= 1)",
    "taste_strength": "franchise/genre taste (liked groups from titles, else publisher): log multiplier",
    "edition_strength": "standard vs limited/collector's edition taste (price tier): log multiplier",
    "price_strength": "price sensitivity (against standardized log price): log multiplier",
    "region_strength": "regional popularity skew of the shopper's region: log multiplier",
    "regions": "number of regions (QueryContext.location)",
    "noise": "std of the idiosyncratic taste no one (not even the oracle) knows",
    "query_taste_bias": "how much taste tilts which queries a shopper types",
    "min_query_clicks": "a real query text is used when at least this many training clicks followed it",
    "floor": "base relevance of a product the query's training clicks never reached (top = 1)",
    "top_attractiveness": "click probability of the shopper's best product once looked at",
    "desktop_patience": "position bias on desktop: probability of looking one position further",
    "mobile_patience": "the same on a phone (QueryContext.device)",
    "mobile_share": "share of shoppers on a phone",
    "continue_after_click": "probability of looking further after a click",
    "cart_rate": "add-to-cart probability after a click (tilted by price sensitivity)",
    "purchase_rate": "purchase probability after an add-to-cart",
    "premium_share": "share of shoppers preferring limited/collector's editions",
}


def cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from evaluation.splits import bestbuy_split
    from sim.live import LiveConfig, LiveSim, figures, now_utc

    params = SimParams(**{f.name: getattr(args, f.name) for f in fields(SimParams)})
    split = bestbuy_split(settings.data_dir)
    world = World(params, split.catalog, split.train)
    searches = world.schedule(split.cutoff)
    if args.max_searches:
        searches = searches[: args.max_searches]
    print(
        f"{LABEL}: {len(searches):,} searches by {params.shoppers} shoppers over {params.days} days, "
        f"{len(world.keys)} real query texts, {len(world.product_ids)} products",
        flush=True,
    )
    versions = _versions(args, settings)
    from bench.loop import prepare

    data = prepare(settings, 0, 0.0, False)  # the catalog and the training period's events
    live = LiveSim(
        world,
        searches,
        LiveConfig(
            registry=args.registry,
            personal_version=versions[0],
            nonpersonal_version=versions[1],
            step_searches=args.step_searches,
            cycle_days=args.cycle_days,
            trainer_epochs=args.trainer_epochs,
            port=args.port,
            keep_topics=args.keep_topics,
        ),
    )
    started = time.monotonic()
    live.run(data.history, data.catalog)
    fig = figures(world, searches, live.served, actions=live.actions)
    fig["engine_ablation"] = _engine_ablation(world, searches, live, fig["ndcg@10"]["nonpersonal"])
    acts = [a for x in searches for a in live.actions.get(x.query_id, [])]
    result: dict[str, Any] = {
        "label": LABEL,
        "what": "simulated shoppers on the real Best Buy catalog and query texts, ranked by a live engine of "
        "its own; NDCG@10 against the simulator's true attractiveness (see sim/world.py)",
        "params": params.as_dict(),
        "searches": len(searches),
        "clicks": sum(a.kind == "click" for a in acts),
        "add_to_carts": sum(a.kind == "add_to_cart" for a in acts),
        "purchases": sum(a.kind == "purchase" for a in acts),
        "versions": {"personal": versions[0], "nonpersonal": versions[1]},
        "served_versions": sorted(set(live.versions.values())),
        **fig,
        "cycles": live.cycles,
        "phases_s": live.phase_s,
        "seconds": round(time.monotonic() - started, 1),
        "step_searches": args.step_searches,
        "cycle_days": args.cycle_days,
        "trainer_epochs": args.trainer_epochs,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "measured_at": now_utc(),
        "command": args.command,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    _merge(args.personalization, result)
    print(
        json.dumps(
            {k: result[k] for k in ("label", "ndcg@10", "gain_share", "personal_minus_nonpersonal")}, indent=1
        )
    )
    print(f"wrote {args.output}")
    return 0


def _engine_ablation(
    world: World, searches: list[SimSearch], live: LiveSim, nonpersonal: float
) -> dict[str, Any] | None:
    """sim.ablation over the searches the personal arm answered with its features (all of them,
    unless a result came without)."""
    from sim.ablation import engine_ablation
    from trainer.pipeline import USER_FEATURES

    replayed = [x for x in searches if x.query_id in live.replays]
    if not replayed:
        return None
    print(f"{LABEL}: replaying {len(replayed):,} personal searches for the engine's ablation", flush=True)
    out = engine_ablation(
        world, replayed, live.replays, live.registries["personal"], USER_FEATURES, nonpersonal
    )
    return {"searches": len(replayed), **out}


def _versions(args: argparse.Namespace, settings: Settings) -> tuple[str, str | None]:
    from core.registry import serving_version

    personal = args.personal_version or serving_version(args.registry)
    if personal is None:
        raise SystemExit(f"no version serves in {args.registry}: run `shoprank train` first, or name one")
    return personal, args.nonpersonal_version


def _merge(path: Path, result: dict[str, Any]) -> None:
    report = json.loads(path.read_text()) if path.exists() else {}
    nd = result["ndcg@10"]
    report.update(
        {
            "sim_label": LABEL,
            "sim_ndcg_personal": nd["personal"],
            "sim_ndcg_nonpersonal": nd["nonpersonal"],
            "sim_ndcg_oracle": nd["oracle"],
            "sim_ndcg_population": nd["population"],
            "sim_gain_share": result["gain_share"],
            "sim_ndcg_learner": nd.get("learner"),
            "sim_learner_gain_share": result.get("learner_gain_share"),
            "sim_params": result["params"],
            "sim_loop": {k: result[k] for k in ("cycle_days", "trainer_epochs")},
            "sim_ablation": result["ablation"],
            "sim_engine_ablation": result["engine_ablation"],
            "sim_searches": result["searches"],
        }
    )
    path.write_text(json.dumps(report, indent=2) + "\n")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help=f"{LABEL}: simulated shoppers through a live engine of its own",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(SimParams):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=f.default,
            help=HELP.get(f.name, f.name),
        )
    p.add_argument("--max-searches", type=int, default=0, help="stop after this many searches (0: all)")
    p.add_argument(
        "--step-searches",
        type=int,
        default=8,
        help="searches published per step (then their clicks, then the feature workers catch up)",
    )
    p.add_argument(
        "--cycle-days",
        type=int,
        default=2,
        help="a continuous-trainer cycle every N simulated days (0: never)",
    )
    p.add_argument(
        "--trainer-epochs",
        type=int,
        default=TRAINER_EPOCHS,
        help="fine-tuning epochs per trainer cycle over the lists so far (see sim.TRAINER_EPOCHS)",
    )
    p.add_argument(
        "--registry",
        type=Path,
        default=ROOT / "models",
        help="where the versions are (copied into the run's own registry, never changed)",
    )
    p.add_argument(
        "--personal-version", default=None, help="the engine's version (default: the registry's SERVING)"
    )
    p.add_argument(
        "--nonpersonal-version",
        default=None,
        help="a version for the nonpersonal arm, e.g. trained without shopper features (default: "
        "none - the engine's own model ranks each search again with the shopper hidden)",
    )
    p.add_argument("--port", type=int, default=8196, help="the engine scorer's HTTP port (the other: +1)")
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "simulation.json")
    p.add_argument("--personalization", type=Path, default=RESULTS / "personalization.json")
    p.add_argument("--command", default="python -m bench.personal sim")
    p.set_defaults(func=cmd_sim)
