"""Prometheus counters of the feature workers (served on ``SHOPRANK_STREAMS_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
UNKNOWN_IMPRESSIONS = Counter(
    "shoprank_unknown_impressions_total",
    "Products shown in ranked results that the catalog did not know (the results are kept)",
)
CONFLICTS = Counter(
    "shoprank_stream_conflicts_total", "Batches re-planned because another writer got there first"
)
REDIS_UNAVAILABLE = Counter(
    "shoprank_stream_redis_unavailable_total",
    "Attempts at a batch that found Redis unreachable after the client's retries (the batch waits)",
)
BATCH_SECONDS = Histogram(
    "shoprank_stream_batch_seconds",
    "Time to apply one batch to Redis (read, plan, commit)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# --- the joiner (served on SHOPRANK_JOINER_METRICS_PORT) -------------------------------------

JOIN_CLICKS = Counter(
    "shoprank_joiner_clicks_total",
    "Clicks the joiner read, by whether they found the list they were shown in",
    ["outcome"],  # matched, off_list (list found, product not in it), unmatched
)
JOIN_LISTS = Counter(
    "shoprank_joiner_lists_total", "Labeled lists emitted", ["revision"],  # first, correction
)
JOIN_LATE = Counter(
    "shoprank_joiner_late_total", "Interactions outside their list's attribution window"
)
JOIN_SKIPPED = Counter(
    "shoprank_joiner_invalid_total", "Records the joiner could not decode (dead-lettered by the workers)",
    ["topic"],
)
JOIN_PUBLISHED = Counter(
    "shoprank_joiner_published_total", "Labeled lists published to the labeled topic and acknowledged"
)
JOIN_REDIS_UNAVAILABLE = Counter(
    "shoprank_joiner_redis_unavailable_total",
    "Joiner steps retried because Redis was unreachable or read-only after the client's retries",
)
JOIN_REPLAYS = Counter(
    "shoprank_joiner_replays_total",
    "Partitions the joiner read again because Redis held less than it had committed (a failover)",
)
JOIN_COVERAGE = Gauge(
    "shoprank_joiner_click_coverage", "Share of clicks that found their impression (all joiners, stored)"
)


def count_join(counts: object) -> None:
    """Add one batch's streams.join.JoinCounts to the counters."""
    c = vars(counts)
    for outcome in ("matched", "off_list", "unmatched"):
        if c[outcome]:
            JOIN_CLICKS.labels(outcome).inc(c[outcome])
    if c["lists"]:
        JOIN_LISTS.labels("first").inc(c["lists"])
    if c["corrections"]:
        JOIN_LISTS.labels("correction").inc(c["corrections"])
    if c["late"]:
        JOIN_LATE.inc(c["late"])
