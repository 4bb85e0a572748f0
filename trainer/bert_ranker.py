"""The personalized BERT ranker as an evaluation method (evaluation.ranker.Ranker).

``fit`` trains a version on the training clicks (trainer.pipeline) and writes it to a registry;
``score`` then ranks through the *served* path: the version's ONNX graphs in onnxruntime
(scorer.runtime) fed by ``features.read`` from a feature store that has seen exactly what had
happened by each query's time (the harness hands clicks over through ``observe`` after they
happen). The figures it earns are the figures of what the scorer serves.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from core.events import CatalogProduct
from core.registry import REJECTED, ModelVersion, load_version, record, serving_version, set_serving
from core.settings import Settings
from evaluation.ranker import BaseRanker, SearchRow
from features.read import FEATURE_NAMES, Request, read_batch
from scorer.runtime import Batch, ServedModel
from trainer.examples import click_event, history, query_event
from trainer.pipeline import TrainRun, train_run, write_version

log = structlog.get_logger(__name__)

# A retrained version within this of the serving one's figure counts as "no worse" (run-to-run
# noise on 8,473 test searches is of this order).
PROMOTION_TOLERANCE = 0.002


class PersonalizedBertRanker(BaseRanker):
    online = True

    def __init__(self, settings: Settings, personalized: bool = True, progress: bool = True) -> None:
        self.name = "bert_personalized" if personalized else "bert_without_shopper_features"
        self._settings = settings
        self._personalized = personalized
        self._progress = progress
        self.run: TrainRun | None = None
        self.version: ModelVersion | None = None
        self._served: ServedModel | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None:
        """Train, and serve the candidate version from a scratch registry while it is evaluated."""
        self.run = train_run(self._settings, rows, catalog, self._personalized, self._progress)
        self._tmp = tempfile.TemporaryDirectory(prefix="shoprank-candidate-")
        self.version = write_version(Path(self._tmp.name), self.run, metrics={}, parent=None)
        self._served = ServedModel(self.version, device=self._settings.scorer.device)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        if self.run is None or self._served is None:
            raise RuntimeError("fit must run before score")
        served, store = self._served, self.run.store
        ids = [c.product_id for c in candidates]
        rows = served.rows(ids)
        out = np.zeros((len(queries), len(ids)), dtype=np.float32)
        for i, q in enumerate(queries):
            user = q.user_id or "anonymous"
            now = q.query_time.timestamp() if q.query_time else 0.0
            feats = read_batch(store, [Request.for_text(user, q.query, ids)], now)[0]
            hist_idx, hist_w = history(feats.recent_products, feats.recent_weights, served.product_index,
                                       served.unknown_row, served.history_len)
            batch = Batch(query_emb=served.encode([q.query]), cand_idx=rows[None, :],
                          hist_idx=hist_idx[None, :], hist_w=hist_w[None, :],
                          dense=feats.features[None, :, :], n_candidates=[len(ids)])
            out[i] = served.score(batch)[0]
            store.apply(query_event(q))
        return out

    def observe(self, row: SearchRow) -> None:
        if self.run is not None and row.product_id:
            self.run.store.apply(click_event(row))

    def promote(self, metrics: dict[str, float], key: str = "map@5",
                name: str | None = None) -> ModelVersion | None:
        """Publish the evaluated version with its metrics; serve it unless it is worse than the
        version serving now (a bad model never replaces a good one). Returns the published version."""
        if self.run is None:
            raise RuntimeError("fit must run before promote")
        registry = self._settings.model.registry_dir
        current = serving_version(registry)
        published = write_version(registry, self.run, metrics, parent=current, name=name)
        serving = load_version(registry, current).manifest if current is not None else {}
        # A version read on other features than this code builds cannot be served (the scorer
        # refuses it), so it is no standard to hold the new one to.
        if tuple(serving.get("config", {}).get("feature_names", ())) == FEATURE_NAMES:
            before = serving.get("metrics", {}).get(key, 0.0)
            if metrics.get(key, 0.0) < before - PROMOTION_TOLERANCE:
                log.warning("model_not_promoted", model_version=published.version, serving=current,
                            metric=key, candidate=metrics.get(key), serving_value=before)
                record(registry, published.version, REJECTED, by="train", serving=current,
                       reason=f"{key} {metrics.get(key, 0.0):.4f} < serving {current}'s {before:.4f}")
                return published
        set_serving(registry, published.version, reason=f"{key} {metrics.get(key, 0.0):.4f}", by="train")
        log.info("model_promoted", model_version=published.version, previous=current, metric=key,
                 value=metrics.get(key))
        return published
