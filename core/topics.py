"""Every topic the engine uses, with explicit partition counts and configs, created by the project.

Keys: queries, results and interactions are keyed by user id (one shopper's events stay in order
on one partition, so a worker owns a shopper); the catalog by product id on a compacted topic
(the latest version of each product is kept forever); model updates on one partition, in order;
labeled lists by user id; ``forget`` requests by user id on a compacted topic. :func:`route`
says where each event of the contract goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from core.events import (
    AddToCart,
    CatalogProduct,
    Click,
    Event,
    LabeledList,
    ModelUpdate,
    Purchase,
    Query,
    RankedResult,
)
from core.settings import Settings, TopicSettings

log = structlog.get_logger(__name__)

RETAIN_FOREVER = {"retention.ms": "-1"}
# The settings field of each topic (for tools that name a whole set, like isolated test topics).
TOPIC_KEYS = tuple(name for name, f in TopicSettings.model_fields.items() if f.annotation is str)


MODEL_UPDATE_KEY = "model"  # one partition anyway: the key only names what the messages are


def topic_field(event: Event) -> str:
    """The :class:`~core.settings.TopicSettings` field naming the topic ``event`` goes to."""
    match event:
        case CatalogProduct():
            return "catalog"
        case Query():
            return "queries"
        case RankedResult():
            return "results"
        case Click() | AddToCart() | Purchase():
            return "interactions"
        case LabeledList():
            return "labeled"
        case ModelUpdate():
            return "model_updates"
    raise TypeError(f"not an event of the contract: {type(event).__name__}")


def event_key(event: Event) -> str:
    """The Kafka key of ``event`` (see the module docstring)."""
    if isinstance(event, CatalogProduct):
        return event.product_id
    if isinstance(event, ModelUpdate):
        return MODEL_UPDATE_KEY
    return event.user_id


def route(settings: Settings, event: Event) -> tuple[str, str]:
    """The topic ``event`` is published on under these settings, and its Kafka key."""
    return getattr(settings.topics, topic_field(event)), event_key(event)


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the project wants it to exist."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    replication_factor: int = 1


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics this deployment needs, named by the settings."""
    t = settings.topics
    # Replicated: each topic on replication_factor brokers, a write acknowledged (acks=all) once
    # min_insync_replicas of them have it.
    replicated = {"min.insync.replicas": str(t.min_insync_replicas)} if t.replication_factor > 1 else {}
    specs = [
        TopicSpec(t.queries, t.partitions, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
        # What the joiner needs (minutes to a day of impressions) and a week for the feature
        # rebuild's impressions (decayed with a 7-day half-life); labels live on the labeled topic.
        TopicSpec(t.results, t.partitions, {"retention.ms": str(7 * 24 * 3600 * 1000)}),
        # The feature rebuild replays interactions from the start: keep them all.
        TopicSpec(t.interactions, t.partitions, RETAIN_FOREVER),
        TopicSpec(
            t.catalog,
            t.partitions,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        ),
        TopicSpec(t.model_updates, 1, RETAIN_FOREVER),
        # Keyed by user id like its inputs (partition p of results and interactions -> p here);
        # the trainer's history, kept.
        TopicSpec(t.labeled, t.partitions, RETAIN_FOREVER),
        TopicSpec(t.dead_letter, 1, RETAIN_FOREVER),
        # Keyed by user id, the latest request kept forever: a rebuild after Redis was lost
        # restores every tombstone before it replays the events.
        TopicSpec(t.forgotten, 1, {"cleanup.policy": "compact"}),
    ]
    return [TopicSpec(s.name, s.partitions, s.config | replicated, t.replication_factor) for s in specs]


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Idempotent."""
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                  config=s.config)
         for s in missing],
        operation_timeout=timeout_s,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
            log.info("topic_created", topic=name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return created
