"""Infrastructure subcommands: ``topics`` (create what is missing) and ``inspect`` (what arrived)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from core import kafka
from core.settings import Settings
from core.topics import ensure_topics, topic_specs


@dataclass(frozen=True)
class TopicCount:
    topic: str
    partitions: int
    messages: int


def count_messages(settings: Settings, topics: list[str]) -> list[TopicCount]:
    """Messages each topic holds now (high minus low watermark, summed over partitions)."""
    consumer = kafka.consumer(settings, group_id="shoprank-inspect")
    try:
        meta = consumer.list_topics(timeout=10)
        counts = []
        for topic in topics:
            parts = meta.topics[topic].partitions if topic in meta.topics else {}
            total = 0
            for p in parts:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                total += high - low
            counts.append(TopicCount(topic, len(parts), total))
        return counts
    finally:
        consumer.close()


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    specs = topic_specs(settings)
    created = ensure_topics(kafka.admin_client(settings), specs)
    detail = f": {', '.join(created)}" if created else ""
    print(f"topics: {len(specs)} ensured, {len(created)} created{detail}")
    # Ready means ready for the engine's consumer groups, not only for metadata.
    waited = kafka.wait_for_groups(settings, specs[0].name)
    if waited > 1:
        print(f"topics: consumer groups served after {waited:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    print(f"{'topic':32} {'partitions':>10} {'messages':>10}")
    for c in count_messages(settings, [s.name for s in topic_specs(settings)]):
        print(f"{c.topic:32} {c.partitions:>10} {c.messages:>10}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="create the engine's topics where missing")
    p.set_defaults(func=cmd_topics)
    p = sub.add_parser("inspect", help="show how many events each topic holds")
    p.set_defaults(func=cmd_inspect)
