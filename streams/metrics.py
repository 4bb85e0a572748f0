"""Prometheus counters of the feature workers (served on ``SHOPRANK_STREAMS_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "shoprank_stream_events_total",
    "Events consumed by the feature workers, by source topic and outcome",
    ["topic", "outcome"],  # outcome: applied, duplicate, dead_letter
)
DEAD_LETTERS = Counter(
    "shoprank_dead_letters_total",
    "Events sent to the dead-letter topic, by source topic and kind of reason",
    ["topic", "kind"],  # kind: invalid, unknown_product
)
CONFLICTS = Counter(
    "shoprank_stream_conflicts_total", "Batches re-planned because another writer got there first"
)
BATCH_SECONDS = Histogram(
    "shoprank_stream_batch_seconds",
    "Time to apply one batch to Redis (read, plan, commit)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
