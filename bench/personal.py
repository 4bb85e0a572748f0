"""``python -m bench.personal``: does personalization move the ranking? (issue 18)

- ``real``: Best Buy's slices (returning shoppers, searches with an earlier search in the session),
  the served ranker with vs without shopper features, and session context chosen on validation
  (evaluation.personal) -> bench/results/personalization.json.
- ``sim``: the shopper simulator (sim/) through a live engine of its own -> bench/results/simulation.json
  (every figure there is SIMULATION).

Heavy parts run under the benchmarks' lock:
``flock -o /tmp/shoprank-heavy.lock python -m bench.personal real``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.logs import configure_logging
from core.settings import ROOT, Settings

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "var" / "personal"


def cmd_real(args: argparse.Namespace, settings: Settings) -> int:
    from evaluation.personal import run

    report = run(settings, args.output, args.work, retrain=args.retrain,
                 only_nonpersonal=args.only_nonpersonal, train=not args.no_train)
    if args.only_nonpersonal:
        return 0
    print(json.dumps({k: report[k] for k in ("bestbuy_returning_delta", "bestbuy_returning_ci95",
                                             "bestbuy_returning_searches")}, indent=1))
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.personal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    real = sub.add_parser("real", help="Best Buy slices with/without shopper features, session context")
    real.add_argument("--output", type=Path, default=RESULTS / "personalization.json")
    real.add_argument("--work", type=Path, default=WORK,
                      help="cached walks and the registry of the trained versions (default var/personal)")
    real.add_argument("--retrain", action="store_true", help="train again even when a walk is cached")
    real.add_argument("--only-nonpersonal", action="store_true",
                      help="only train and walk the model without shopper features (cached for the report)")
    real.add_argument("--no-train", action="store_true",
                      help="train nothing: the model without shopper features is reported when its walk "
                           "is cached")
    real.set_defaults(func=cmd_real)
    try:
        from sim.cli import register  # the simulator's subcommand, when present
        register(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging()
    return int(args.func(args, settings))


if __name__ == "__main__":
    raise SystemExit(main())
