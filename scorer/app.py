"""Assembles a running scorer from settings: model, feature store, Kafka loop, swap listener, HTTP."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import structlog
import uvicorn

from core.registry import RegistryError, serving_version
from core.settings import Settings
from features.redis_store import RedisStore, connect
from scorer.http import create_app
from scorer.metrics import ScorerMetrics
from scorer.ranking import QueryRanker
from scorer.rerank import RerankingRanker, rerank_allowed, store_texts, version_sessions
from scorer.runtime import EmbeddingSource, load_served_model
from scorer.service import ScoringLoop
from scorer.swap import ModelHolder, UpdateListener

log = structlog.get_logger(__name__)


@dataclass
class Scorer:
    holder: ModelHolder
    ranker: QueryRanker
    metrics: ScorerMetrics
    loop: ScoringLoop
    listener: UpdateListener
    store: RedisStore

    def ready(self) -> dict[str, bool]:
        try:
            redis_ok = bool(self.store.client.ping())
        except Exception:  # readiness reports, it does not raise
            redis_ok = False
        kafka_ok = self.loop.assigned.is_set() and self.loop.is_alive()
        return {"model": True, "redis": redis_ok, "kafka": kafka_ok}

    def start(self) -> None:
        self.listener.start()
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self.listener.stop()
        self.loop.join(timeout=10)
        self.listener.join(timeout=10)


def build_scorer(settings: Settings) -> Scorer:
    """Everything a scorer needs, built from settings; raises when no model version is serving."""
    registry = settings.model.registry_dir
    version = serving_version(registry)
    if version is None:
        raise RegistryError(f"no model version is serving in {registry}: run `shoprank train` first")
    metrics = ScorerMetrics()
    # Reads only: a replica may serve them when the settings allow (replicated Redis).
    store = RedisStore(connect(settings.redis, replica=settings.redis.read_from_replicas),
                       settings.features, settings.streams)
    # Products embedded after training (shoprank embedder); swapped-in versions read them too.
    embeddings = EmbeddingSource(store.client, settings.scorer.embeddings_refresh_s)
    model = load_served_model(registry, version, device=settings.scorer.device,
                              threads=settings.scorer.threads, embeddings=embeddings)
    log.info("scorer_device", device=model.device, providers=model.providers, model_version=version)
    holder = ModelHolder(model, registry, settings.scorer.device, metrics)
    ranker = QueryRanker(store, settings.scorer.retrieve_k, settings.scorer.max_candidates, metrics=metrics)
    if rerank_allowed(settings.scorer.rerank, model.device):  # a no-op for versions without one
        ranker = RerankingRanker(ranker, version_sessions(registry, model.providers),  # type: ignore[assignment]
                                 store_texts(store))
    loop = ScoringLoop(settings, holder, ranker, metrics)
    return Scorer(holder, ranker, metrics, loop, UpdateListener(settings, holder), store)


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the scorer until interrupted: Kafka loop and swap listener in threads, HTTP in this one."""
    scorer = build_scorer(settings)
    scorer.start()
    app = create_app(scorer.holder, scorer.ranker, scorer.metrics, scorer.ready)
    config = uvicorn.Config(app, host=settings.scorer.http_host, port=settings.scorer.http_port,
                            log_config=None, access_log=False)
    server = uvicorn.Server(config)
    log.info("scorer_started", http=f"{settings.scorer.http_host}:{settings.scorer.http_port}",
             topic=settings.topics.queries, max_batch=settings.scorer.max_batch,
             max_wait_ms=settings.scorer.max_wait_ms)
    try:
        server.run()
    finally:
        scorer.stop()
