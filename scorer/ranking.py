"""Ranking a micro-batch of queries: candidates, features in one round trip, one model call.

Used by the Kafka loop and the HTTP API alike. Every query gets an answer: a ranked result, or
an error result whose ``error`` says why (an invalid event, too many candidates). Unknown
shoppers are ranked without personal signal (their features read as cold start); candidate ids
the model version has no embedding for are ranked on their features alone and counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import msgspec
import numpy as np
import structlog

from core.events import QUERIES, InvalidEvent, Query, RankedProduct, RankedResult, ServedFeatures
from core.logs import hash_user
from features.read import FEATURE_NAMES, Request, Result, feature_schema, read_batch
from features.store import FeatureStore
from scorer.metrics import ScorerMetrics
from scorer.runtime import Batch, ServedModel

log = structlog.get_logger(__name__)

UNKNOWN = "unknown"
Mark = tuple[float, float]  # (time.perf_counter(), time.thread_time()): where a stage started


def mark() -> Mark:
    return time.perf_counter(), time.thread_time()


@dataclass(frozen=True)
class Incoming:
    """A raw query as it arrived, and when it was published (epoch seconds)."""

    payload: bytes
    published_at: float


def decode_all(items: Sequence[Incoming]) -> tuple[list[tuple[Query, float]], list[RankedResult]]:
    """Valid queries (with publish time) and error results for the invalid ones."""
    queries, errors = [], []
    for item in items:
        try:
            queries.append((QUERIES.decode(item.payload), item.published_at))
        except InvalidEvent as exc:
            errors.append(error_result(item.payload, f"invalid query: {exc.reason}", item.published_at))
    return queries, errors


def error_result(payload: bytes, reason: str, published_at: float,
                 model_version: str = UNKNOWN) -> RankedResult:
    """An answer that carries the reason; ids are recovered from the payload where possible."""
    ids = _recover_ids(payload)
    log.warning("query_rejected", query_id=ids["query_id"], user=hash_user(ids["user_id"]), reason=reason)
    return RankedResult(query_id=ids["query_id"], user_id=ids["user_id"], session_id=ids["session_id"],
                        model_version=model_version, products=[], error=reason,
                        latency_ms=max(0.0, (time.time() - published_at) * 1000), timestamp=datetime.now(UTC))


def _recover_ids(payload: bytes) -> dict[str, str]:
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}

    def pick(key: str) -> str:
        value = body.get(key)
        return value if isinstance(value, str) and value.strip() and len(value) <= 128 else UNKNOWN

    return {k: pick(k).split()[0] for k in ("query_id", "user_id", "session_id")}


def feature_contributions(model: ServedModel, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's part in the scores of one query's candidates (``batch`` from
    :meth:`QueryRanker.prepare` for one query): the score change when that feature alone is set to
    its training mean (the manifest's ``feature_mean``). Returns the served scores [N] and the
    contributions [N, F]; a feature's share of a score is its contribution over the sum of their
    absolute values. One model call: the ranking head scores each candidate on its own."""
    n, f = batch.n_candidates[0], len(model.feature_names)
    means = model.feature_means
    dense = np.repeat(batch.dense[:1, :n], f + 1, axis=0)  # one variant per feature, served input last
    dense[np.arange(f), :, np.arange(f)] = means[:, None]
    variants = replace(batch, query_emb=np.repeat(batch.query_emb[:1], f + 1, axis=0),
                       cand_idx=np.repeat(batch.cand_idx[:1, :n], f + 1, axis=0),
                       hist_idx=np.repeat(batch.hist_idx[:1], f + 1, axis=0),
                       hist_w=np.repeat(batch.hist_w[:1], f + 1, axis=0), dense=dense,
                       n_candidates=[n] * (f + 1))
    scores = np.stack(model.score(variants))  # [F + 1, N]
    return scores[-1], (scores[-1] - scores[:-1]).T


def feature_shares(contributions: np.ndarray) -> np.ndarray:
    """Contributions [N, F] as shares of each candidate's total absolute contribution."""
    total = np.abs(contributions).sum(axis=-1, keepdims=True)
    return contributions / np.where(total > 0, total, 1.0)


class QueryRanker:
    """Ranks batches of valid queries with the model version it is handed."""

    def __init__(self, store: FeatureStore, retrieve_k: int, max_candidates: int,
                 with_features: bool = True, metrics: ScorerMetrics | None = None) -> None:
        self.store = store
        self.retrieve_k = retrieve_k
        self.max_candidates = max_candidates
        self.with_features = with_features
        self.metrics = metrics

    def rank(self, model: ServedModel, queries: Sequence[tuple[Query, float]]) -> list[RankedResult]:
        if not queries:
            return []
        too_many = [(q, t) for q, t in queries if q.candidates and len(q.candidates) > self.max_candidates]
        ok = [(q, t) for q, t in queries if not (q.candidates and len(q.candidates) > self.max_candidates)]
        out = [self._too_many(q, t, model.version) for q, t in too_many]
        if ok:
            out.extend(self._rank_valid(model, ok))
        return out

    def _too_many(self, q: Query, published_at: float, version: str) -> RankedResult:
        reason = f"{len(q.candidates or [])} candidates, more than the {self.max_candidates} allowed"
        return error_result(msgspec.json.encode(q), reason, published_at, version)

    def prepare(self, model: ServedModel, queries: Sequence[Query]) -> Batch:
        """Embed the queries, settle their candidates, read their features: the model's inputs."""
        return self._prepare(model, queries)[0]

    def _prepare(self, model: ServedModel, queries: Sequence[Query]) -> tuple[Batch, list[Result]]:
        """The model's inputs, and the features as read (their history ids, which the batch holds
        only as embedding rows, go out with the results)."""
        started = mark()
        query_emb = model.encode([q.text for q in queries])
        retrieved = None
        if any(not q.candidates for q in queries):
            retrieved = model.retrieve(query_emb, self.retrieve_k)
        cands: list[list[str]] = []
        for i, q in enumerate(queries):
            if q.candidates:
                cands.append(list(dict.fromkeys(q.candidates)))
            else:
                cands.append([model.product_ids[r] for r in retrieved[i]])  # type: ignore[index]
        requests = [Request.for_text(q.user_id, q.text, c,
                                     positions=list(range(1, len(c) + 1)) if q.candidates else None,
                                     context=q.context)
                    for q, c in zip(queries, cands, strict=True)]
        started = self.time_stage("encode", started)
        feats = read_batch(self.store, requests, now=max(q.timestamp.timestamp() for q in queries))
        batch = self._batch(model, query_emb, cands, feats)
        self.time_stage("features", started)
        return batch, feats

    def _rank_valid(self, model: ServedModel, queries: Sequence[tuple[Query, float]]) -> list[RankedResult]:
        batch, feats = self._prepare(model, [q for q, _ in queries])
        started = mark()
        scores = model.score(batch)
        started = self.time_stage("model", started)
        schema = feature_schema(model.feature_names)
        results = [self._result(model, q, t, c, batch.dense[i], s, schema, f, batch.cand_idx[i, : len(c)])
                   for i, ((q, t), c, s, f) in enumerate(zip(queries, batch.candidates, scores, feats,
                                                            strict=True))]
        self.time_stage("results", started)
        return results

    def time_stage(self, name: str, started: Mark) -> Mark:
        """Record the time since ``started`` (a :func:`mark`) under stage ``name``: wall time in
        ``shoprank_stage_seconds``, this thread's CPU time in ``shoprank_stage_cpu_seconds`` (the
        reranker and the Kafka loop time their stages here too); returns now, the next stage's start."""
        now = mark()
        if self.metrics is not None:
            wall, cpu = self.metrics.stage_of(name)
            wall.observe(now[0] - started[0])
            cpu.inc(max(0.0, now[1] - started[1]))
        return now

    @staticmethod
    def _batch(model: ServedModel, query_emb: np.ndarray, cands: list[list[str]], feats: list) -> Batch:
        n = max(len(c) for c in cands)
        b = len(cands)
        cand_idx = np.full((b, n), model.unknown_row, np.int64)
        dense = np.zeros((b, n, len(FEATURE_NAMES)), np.float32)
        hist_idx = np.full((b, model.history_len), model.unknown_row, np.int64)
        hist_w = np.zeros((b, model.history_len), np.float32)
        for i, (c, f) in enumerate(zip(cands, feats, strict=True)):
            cand_idx[i, : len(c)] = model.rows(c)
            dense[i, : len(c)] = f.features
            k = min(model.history_len, len(f.recent_products))
            hist_idx[i, :k] = model.rows(list(f.recent_products[:k]))
            hist_w[i, :k] = f.recent_weights[:k]
        return Batch(query_emb, cand_idx, hist_idx, hist_w, dense, [len(c) for c in cands], cands)

    def _result(self, model: ServedModel, q: Query, published_at: float, cands: list[str],
                dense: np.ndarray, scores: np.ndarray, schema: str, read: Result,
                rows: np.ndarray) -> RankedResult:
        order = np.argsort(-scores, kind="stable")
        # Whole arrays to Python values at once: per-element numpy indexing cost more than the
        # rest of building the result.
        ranked_scores = scores[order].tolist()
        products = [RankedProduct(product_id=cands[j], score=score, position=pos)
                    for pos, (j, score) in enumerate(zip(order.tolist(), ranked_scores, strict=True), 1)]
        served = None
        if self.with_features:
            # One float32 matrix, rows in ranked order, and the history exactly as the model got
            # it (cut to history_len): what a labeled list trains on later, with no train/serve skew.
            k = min(model.history_len, len(read.recent_products))
            served = ServedFeatures.pack(schema, dense[order], list(read.recent_products[:k]),
                                         read.recent_weights[:k].tolist())
        unknown = int(np.count_nonzero(rows == model.unknown_row))  # rows: the candidates' table rows
        if unknown:
            log.info("unknown_candidates", query_id=q.query_id, count=unknown, model_version=model.version)
        return RankedResult(query_id=q.query_id, user_id=q.user_id, session_id=q.session_id,
                            model_version=model.version, products=products, text=q.text, features=served,
                            latency_ms=max(0.0, (time.time() - published_at) * 1000),
                            # The search's event time: impressions decay and the joiner's windows
                            # run in event time (a replay stays a replay); latency_ms is the wait.
                            timestamp=q.timestamp)
