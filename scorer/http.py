"""The HTTP API beside the Kafka path, for synchronous callers.

- ``POST /rank``: a query event (the contract's JSON) -> its ranked result
- ``POST /explain?product_id=...``: each feature's value for one candidate and its share of the
  score (the score change when the feature is set to its training mean, normalized)
- ``GET /healthz``: the process is up; ``GET /readyz``: a model is loaded, Redis answers and the
  Kafka loop has its partitions
- ``GET /metrics``: Prometheus (latency histogram, batch sizes, queue depth, lag, model version)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from fastapi import FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from core.events import QUERIES, InvalidEvent, Query, to_builtins
from features.read import FEATURE_NAMES
from scorer.metrics import ScorerMetrics
from scorer.ranking import QueryRanker, error_result, feature_contributions, feature_shares
from scorer.swap import ModelHolder


def create_app(holder: ModelHolder, ranker: QueryRanker, metrics: ScorerMetrics,
               ready: Callable[[], dict[str, bool]]) -> FastAPI:
    app = FastAPI(title="shoprank scorer")

    @app.post("/rank")
    async def rank(request: Request) -> dict:
        body = await request.body()
        published = time.time()
        try:
            query = QUERIES.decode(body)
        except InvalidEvent as exc:
            return to_builtins(error_result(body, f"invalid query: {exc.reason}", published))
        result = ranker.rank(holder.current, [(query, published)])[0]
        metrics.queries.labels(outcome="error" if result.error else "ranked").inc()
        return to_builtins(result)

    @app.post("/explain")
    async def explain(request: Request, product_id: str) -> dict:
        body = await request.body()
        try:
            query = QUERIES.decode(body)
        except InvalidEvent as exc:
            raise HTTPException(status_code=422, detail=exc.reason) from None
        single = msgspec.structs.replace(query, candidates=[product_id])
        return explain_one(holder, ranker, single, product_id)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model_version": holder.current.version}

    @app.get("/readyz")
    def readyz(response: Response) -> dict:
        checks = ready()
        response.status_code = 200 if all(checks.values()) else 503
        return {"ready": all(checks.values()), **checks, "model_version": holder.current.version}

    @app.get("/metrics")
    def prometheus() -> Response:
        # The scorer's own figures, then the process-wide ones (the speller's cache lookups).
        body = generate_latest(metrics.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def explain_one(holder: ModelHolder, ranker: QueryRanker, query: Query, product_id: str) -> dict:
    """Feature values and each one's share of the score, by setting it to its training mean."""
    model = holder.current
    batch = ranker.prepare(model, [query])
    values = batch.dense[0, 0]
    scores, contributions = feature_contributions(model, batch)
    shares = feature_shares(contributions)
    return {
        "query_id": query.query_id, "product_id": product_id, "model_version": model.version,
        "score": float(scores[0]),
        "features": {name: {"value": float(values[i]), "contribution": float(contributions[0, i]),
                            "share": float(shares[0, i])}
                     for i, name in enumerate(FEATURE_NAMES)},
    }
