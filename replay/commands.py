"""``shoprank replay``: publish a real dataset's events into Kafka in timestamp order."""

from __future__ import annotations

import argparse
from dataclasses import replace

from core.settings import Settings

# Eleven weeks (the Best Buy log) in ten minutes.
ELEVEN_WEEKS_IN_TEN_MINUTES = 11 * 7 * 24 * 3600 / 600


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from core import kafka
    from core.topics import ensure_topics, topic_specs
    from replay.publisher import publish
    from replay.to_events import bestbuy_replay

    ensure_topics(kafka.admin_client(settings), topic_specs(settings))
    replay = bestbuy_replay(settings.data_dir)
    events = [] if args.catalog_only else replay.events[: args.limit]
    stats = publish(settings, replace(replay, events=events), speed=args.speed,
                    progress=not args.no_progress)
    print(f"replay {args.dataset}: {stats.catalog} catalog products, {stats.events} events "
          f"in {stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="publish a dataset's events into Kafka in timestamp order")
    p.add_argument("--dataset", choices=["bestbuy"], default="bestbuy",
                   help="the dataset to replay (CrowdFlower has no users or times to replay)")
    p.add_argument("--speed", type=float, default=None, metavar="FACTOR",
                   help="play FACTOR times faster than real time (default: as fast as possible; "
                        f"{ELEVEN_WEEKS_IN_TEN_MINUTES:.0f} plays the eleven weeks in ten minutes)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="publish only the first N events")
    p.add_argument("--catalog-only", action="store_true", help="publish the catalog and nothing else")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)
