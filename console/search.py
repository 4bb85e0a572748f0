"""A search for a chosen shopper, ranked as the scorer ranks it, with each feature's share.

The ranking is the scorer's own: the serving version loaded by :func:`scorer.runtime.load_served_model`
(re-loaded when the registry's SERVING changes), features from Redis through the scorer's
:class:`~scorer.ranking.QueryRanker` (and its cross-encoder stage where the scorer's settings
would run it), the query validated by the event contract. The shares come from
:func:`scorer.ranking.feature_contributions`, the function the scorer's ``/explain`` uses.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import numpy as np
import structlog

from console.errors import ConsoleError
from core.events import QUERIES, InvalidEvent, RankedResult
from core.registry import serving_version
from core.settings import Settings
from features.read import FEATURE_NAMES
from features.redis_store import RedisStore
from scorer.ranking import QueryRanker, feature_contributions, feature_shares
from scorer.rerank import RerankingRanker, rerank_allowed, store_texts, version_sessions
from scorer.runtime import EmbeddingSource, ServedModel, load_served_model

log = structlog.get_logger(__name__)

SHOWN_FEATURES = 4  # the strongest shares shown beside each product; the rest under "explain"


@dataclass(frozen=True)
class Share:
    feature: str
    value: float
    contribution: float
    share: float


@dataclass(frozen=True)
class Row:
    position: int
    product_id: str
    title: str | None
    score: float
    shares: list[Share]  # every feature, strongest share first

    @property
    def top(self) -> list[Share]:
        return self.shares[:SHOWN_FEATURES]


@dataclass(frozen=True)
class Ranked:
    user_id: str
    text: str
    at: datetime
    model_version: str
    rows: list[Row]
    candidates: int
    reranked: bool  # the cross-encoder reordered the top: shares explain the first stage


class Searcher:
    """Holds the serving version (loaded on first use, reloaded when SERVING changes)."""

    def __init__(self, settings: Settings, store: RedisStore) -> None:
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()  # a ServedModel scores one call at a time
        self._model: ServedModel | None = None
        self._ranker: QueryRanker | RerankingRanker | None = None
        self._first_stage: QueryRanker | None = None

    def close(self) -> None:
        if self._model is not None:
            self._model.close()

    def _load(self) -> ServedModel:
        registry = self.settings.model.registry_dir
        version = serving_version(registry)
        if version is None:
            raise ConsoleError(f"No model version is serving in {registry}: train one "
                               "(`shoprank train`, or `shoprank model init` for a zero-shot one).", 503)
        if self._model is not None and self._model.version == version:
            return self._model
        s = self.settings
        try:
            vectors = EmbeddingSource(self.store.client, s.scorer.embeddings_refresh_s)
            model = load_served_model(registry, version, device=s.scorer.device, embeddings=vectors)
        except Exception as exc:  # the registry's fault, said on the page: the console stays up
            raise ConsoleError(f"The serving version {version} does not load: {exc}", 503) from None
        first = QueryRanker(self.store, s.scorer.retrieve_k, s.scorer.max_candidates)
        ranker: QueryRanker | RerankingRanker = first
        if rerank_allowed(s.scorer.rerank, model.device):  # as scorer.app.build_scorer does
            sessions = version_sessions(registry, model.providers)
            ranker = RerankingRanker(first, sessions, store_texts(self.store))
        if self._model is not None:
            self._model.close()
        self._model, self._ranker, self._first_stage = model, ranker, first
        log.info("console_model_loaded", model_version=version)
        return model

    def search(self, user_id: str, text: str, at: datetime | None = None) -> Ranked:
        """Rank ``text`` for ``user_id`` as of ``at`` (event time; default now)."""
        if not text.strip():
            raise ConsoleError("Type a query to search for.")
        if not user_id.strip():
            raise ConsoleError("Choose a shopper: a user id (any id; one the store does not know is "
                               "ranked as a new shopper).")
        at = at or datetime.now(UTC)
        body = {"type": "query", "query_id": f"console-{uuid.uuid4().hex[:12]}", "user_id": user_id.strip(),
                "session_id": "console", "text": text, "timestamp": at.isoformat()}
        try:  # the contract's own checks, so the console refuses what the scorer would
            query = QUERIES.decode(msgspec.json.encode(body))
        except InvalidEvent as exc:
            raise ConsoleError(f"This query is not valid: {exc.reason}") from None
        with self._lock:
            model = self._load()
            assert self._ranker is not None and self._first_stage is not None
            result: RankedResult = self._ranker.rank(model, [(query, time.time())])[0]
            if result.error:
                raise ConsoleError(f"The scorer's ranking refused this query: {result.error}")
            batch = self._first_stage.prepare(model, [query])
            scores, contributions = feature_contributions(model, batch)
        reranked = isinstance(self._ranker, RerankingRanker) and self._ranker.session_for(model) is not None
        shares = feature_shares(contributions)
        index = {pid: i for i, pid in enumerate(batch.candidates[0])}
        shown = result.products[: self.settings.console.top_k]
        docs = self.store.products([p.product_id for p in shown])
        rows = []
        for p in shown:
            i = index[p.product_id]
            order = np.argsort(-np.abs(shares[i]), kind="stable")
            rows.append(Row(p.position, p.product_id,
                            docs[p.product_id].title if p.product_id in docs else None, p.score,
                            [Share(FEATURE_NAMES[j], float(batch.dense[0, i, j]), float(contributions[i, j]),
                                   float(shares[i, j])) for j in order]))
            if not reranked and abs(scores[i] - p.score) > 1e-3:  # the explained input is the served one
                log.warning("console_explain_differs", product_id=p.product_id, served=p.score,
                            explained=float(scores[i]))
        return Ranked(user_id, text, at, model.version, rows, len(result.products), reranked)
