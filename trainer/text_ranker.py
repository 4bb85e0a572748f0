"""The fine-tuned text model, evaluated on CrowdFlower (graded relevance, no shoppers).

The same network as the personalized ranker without dense features or history: the query tower
(all-MiniLM-L6-v2) is fine-tuned with the listwise loss on the graded judgements of the training
folds, products are embedded by the pretrained encoder (the zero-shot baseline's exact vectors),
and the head learns how to read the text match. Zero-shot MiniLM is its baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from core.events import CatalogProduct
from core.pretrained import minilm_path
from core.text import product_long_text
from evaluation import metrics
from evaluation.baselines import minilm_encoder
from evaluation.ranker import BaseRanker, SearchRow
from trainer.fit import Examples, FitConfig, TextBatcher, fit, predict
from trainer.model import PersonalRanker, RankerConfig, load_encoder


class ProductVectors:
    """Pretrained embeddings of product texts, computed once and shared across folds."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.table = np.zeros((0, 384), dtype=np.float32)

    def add(self, products: Sequence[CatalogProduct]) -> None:
        new = list({p.product_id: p for p in products if p.product_id not in self.rows}.values())
        if not new:
            return
        vectors = minilm_encoder().encode([product_long_text(p) for p in new], batch_size=64,
                                          normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False).astype(np.float32)
        for p in new:
            self.rows[p.product_id] = len(self.rows)
        self.table = np.vstack([self.table, vectors])

    def with_zero_row(self) -> np.ndarray:
        return np.vstack([self.table, np.zeros((1, self.table.shape[1]), np.float32)])


def ndcg_at_10(scores: np.ndarray, grades: np.ndarray, valid: np.ndarray) -> float:
    return float(metrics.per_query(scores, grades, valid)["ndcg@10"].mean())


class FineTunedTextRanker(BaseRanker):
    """Fit: fine-tune on the training judgements, one list per query. Score: the fine-tuned model."""

    name = "minilm_finetuned"

    def __init__(self, vectors: ProductVectors, cfg: FitConfig | None = None) -> None:
        self._vectors = vectors
        self._cfg = cfg or FitConfig(epochs=4, batch_size=32, learning_rate=1e-3, encoder_learning_rate=5e-5)
        path = minilm_path()
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._model = PersonalRanker(RankerConfig(feature_names=(), personalized=False, train_layers=3),
                                     load_encoder(path))

    def fit(self, rows: Sequence[SearchRow], catalog: Mapping[str, CatalogProduct]) -> None:
        self._vectors.add(list(catalog.values()))
        by_query: dict[str, list[SearchRow]] = {}
        for row in rows:
            by_query.setdefault(row.query, []).append(row)
        texts = list(by_query)
        width = max(len(v) for v in by_query.values())
        ex = _empty_examples(texts, len(texts), width)
        for i, judged in enumerate(by_query.values()):
            ex.text_id[i] = i
            ex.cand_idx[i, : len(judged)] = [self._vectors.rows[r.product_id or ""] for r in judged]
            ex.grades[i, : len(judged)] = [r.grade for r in judged]
            ex.valid[i, : len(judged)] = True
        fit(self._model, self._tokenizer, self._vectors.with_zero_row(), ex, None, self._cfg, ndcg_at_10)

    def score(self, queries: Sequence[SearchRow], candidates: Sequence[CatalogProduct]) -> np.ndarray:
        self._vectors.add(list(candidates))
        texts = [q.query for q in queries]
        ex = _empty_examples(texts, len(texts), len(candidates))
        ex.text_id[:] = np.arange(len(texts))
        ex.cand_idx[:] = [self._vectors.rows[c.product_id] for c in candidates]
        ex.valid[:] = True
        batcher = TextBatcher(self._tokenizer, texts, self._model.cfg.max_query_len)


        return predict(self._model, batcher, torch.from_numpy(self._vectors.with_zero_row()), ex)


def _empty_examples(texts: list[str], n: int, width: int) -> Examples:
    return Examples(
        texts=texts,
        text_id=np.zeros(n, np.int64),
        cand_idx=np.zeros((n, width), np.int64),
        grades=np.zeros((n, width), np.int64),
        dense=np.zeros((n, width, 0), np.float32),
        hist_idx=np.zeros((n, 1), np.int64),
        hist_w=np.zeros((n, 1), np.float32),
        valid=np.zeros((n, width), bool),
    )
