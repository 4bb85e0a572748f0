"""``shoprank scorer``: run the ranking service (Kafka loop + HTTP API); ``shoprank embedder``:
embed catalog products with the serving version's product tower, into Redis."""

from __future__ import annotations

import argparse

from core.settings import Settings


def cmd_scorer(args: argparse.Namespace, settings: Settings) -> int:
    from scorer.app import serve

    serve(settings)
    return 0


def cmd_embedder(args: argparse.Namespace, settings: Settings) -> int:
    from scorer.embedder import run_embedder

    return run_embedder(settings, once=args.once)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scorer", help="run the scorer: query events in, ranked results out; HTTP API")
    p.set_defaults(func=cmd_scorer)
    p = sub.add_parser("embedder", help="embed catalog products with the serving version's product tower "
                                        "(into Redis, where every scorer reads them)")
    p.add_argument("--once", action="store_true",
                   help="embed the whole catalog for the serving version's tower, then exit")
    p.set_defaults(func=cmd_embedder)
