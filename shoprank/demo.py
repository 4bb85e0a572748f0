"""``shoprank demo``: the main job end to end on the real Best Buy data.

Stages, each printed as it runs: make sure the topics exist; publish the Best Buy catalog and its
searches and clicks into Kafka (skipped when the topics already hold them: ids are stable, so a
second replay would only be recognised and ignored downstream); show what arrived, per topic.
"""

from __future__ import annotations

import argparse
import sys

from core import kafka
from core.commands import cmd_inspect, count_messages
from core.settings import Settings
from core.topics import ensure_topics, topic_specs


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def replay_if_needed(settings: Settings, force: bool) -> None:
    from replay.publisher import publish
    from replay.to_events import Stream, bestbuy_replay

    replay = bestbuy_replay(settings.data_dir)
    expected = sum(1 for e in replay.events if e.stream is Stream.INTERACTIONS)
    held = count_messages(settings, [settings.topics.interactions])[0].messages
    if held >= expected and not force:
        print(f"the interactions topic already holds {held:,} events (the replay has {expected:,}): "
              "not replaying again (--replay forces it)")
        return
    stats = publish(settings, replay, progress=sys.stderr.isatty())
    print(f"published {stats.catalog:,} catalog products and {stats.events:,} searches and clicks "
          f"in {stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    _stage("topics")
    created = ensure_topics(kafka.admin_client(settings), topic_specs(settings))
    print(f"{len(topic_specs(settings))} topics ready ({len(created)} created)")
    _stage("replay the Best Buy search log (Aug-Oct 2011) into Kafka")
    replay_if_needed(settings, force=args.replay)
    _stage("what arrived, per topic")
    cmd_inspect(args, settings)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the Best Buy data")
    p.add_argument("--replay", action="store_true", help="replay the dataset even if Kafka already holds it")
    p.set_defaults(func=cmd_demo)
