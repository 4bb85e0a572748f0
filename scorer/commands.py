"""``shoprank scorer``: run the ranking service (Kafka loop + HTTP API)."""

from __future__ import annotations

import argparse

from core.settings import Settings


def cmd_scorer(args: argparse.Namespace, settings: Settings) -> int:
    from scorer.app import serve

    serve(settings)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scorer", help="run the scorer: query events in, ranked results out; HTTP API")
    p.set_defaults(func=cmd_scorer)
