"""``shoprank streams`` (run a feature worker), ``shoprank joiner`` (labeled lists from what was
served), ``shoprank rebuild``, ``shoprank forget USER``."""

from __future__ import annotations

import argparse
import time

from core.settings import Settings


def cmd_streams(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker

    return run_worker(settings)


def cmd_joiner(args: argparse.Namespace, settings: Settings) -> int:
    from streams.joiner import run_joiner

    return run_joiner(settings)


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from streams.rebuild import rebuild

    report = rebuild(settings, progress=not args.quiet)
    print(f"rebuild: {report.events} events from {report.records} records in {report.seconds:.1f} s, "
          f"{report.dead_letters} dead letters, {report.cleared} keys cleared first, "
          f"{report.tombstones} forgotten shoppers kept forgotten")
    return 0


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from features.redis_store import RedisStore, connect
    from streams.forget import forget

    at = args.at if args.at is not None else time.time()
    forget(settings, RedisStore(connect(settings.redis), settings.features, settings.streams), args.user, at)
    print(f"forget: {args.user} removed; their events up to {at:.3f} (epoch s) stay ignored")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("streams", help="run a feature worker: events -> features in Redis")
    p.set_defaults(func=cmd_streams)
    p = sub.add_parser("joiner", help="join ranked results with the clicks that followed: labeled lists")
    p.set_defaults(func=cmd_joiner)
    p = sub.add_parser("rebuild", help="recompute all features in Redis from the retained Kafka log")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rebuild)
    p = sub.add_parser("forget", help="remove a shopper's features; late events do not bring them back")
    p.add_argument("user", help="the shopper's user_id")
    p.add_argument("--at", type=float, default=None,
                   help="ignore their events up to this event time (epoch s; default: now)")
    p.set_defaults(func=cmd_forget)
