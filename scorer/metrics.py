"""Prometheus metrics of the scorer (served on the HTTP API's /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ScorerMetrics:
    """One registry per scorer, so tests can run several scorers in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "shoprank_query_latency_seconds", "Query publish to ranked result produced", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.batch_size = Histogram(
            "shoprank_batch_size", "Queries per scoring batch", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.queries = Counter("shoprank_queries", "Queries answered, by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("shoprank_queue_depth", "Queries waiting in the scorer", registry=r)
        self.consumer_lag = Gauge("shoprank_consumer_lag", "Query messages not yet consumed", registry=r)
        self.model_version = Gauge("shoprank_model_version_info", "Model version served", ["version"],
                                   registry=r)
        self.swaps = Counter("shoprank_model_swaps", "Model swaps, by outcome", ["outcome"], registry=r)
        # Where a batch's time goes, for whoever is paged for p99: encode (query embeddings and
        # retrieval), features (one Redis round trip and featurizing), model (the ranking head),
        # results (building the ranked results), publish (encoding them, handing them to the
        # producer), rerank (the cross-encoder, where it runs); consume (CPU only: the Kafka loop's
        # polling for queries, delivery reports and commits, idle turns included).
        self.stage = Histogram(
            "shoprank_stage_seconds", "Time a scoring batch spends in each stage", ["stage"], registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        # The same stages in CPU time of the thread that ran them (time.thread_time): what a query
        # costs wherever it runs, where wall time also counts waiting for Redis and for the cores.
        # onnxruntime's own worker threads (intra_op_num_threads > 1) are not in it.
        self.stage_cpu = Counter(
            "shoprank_stage_cpu_seconds", "CPU time of the scoring thread in each stage", ["stage"],
            registry=r,
        )
        self._stages: dict[str, tuple[Any, Any]] = {}
        self.ranked = self.queries.labels(outcome="ranked")
        self.errors = self.queries.labels(outcome="error")

    def stage_of(self, name: str) -> tuple[Any, Any]:
        """A stage's (wall histogram, CPU counter), looked up once: ``labels()`` costs a lock and
        a dict lookup, several times per batch."""
        children = self._stages.get(name)
        if children is None:
            children = self._stages[name] = (self.stage.labels(stage=name), self.stage_cpu.labels(stage=name))
        return children

    def serving(self, version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)
