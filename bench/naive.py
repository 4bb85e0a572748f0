"""The baseline the scorer benchmark compares with: ranking as one would without this engine.

Eager PyTorch with plain ``transformers``, one query at a time: embed the query and its 100
candidate product texts with the same encoder the model version serves (its fine-tuned query
tower, MiniLM for the real model), mean-pool, L2-normalize, score by cosine, sort. No ONNX, no
micro-batching, no precomputed product embeddings, no features. Product texts are truncated at
the same 64 word pieces the engine embeds them with (sentence-transformers' default for this
model would be 256: the baseline is given the cheaper setting, so the comparison flatters it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import structlog
import torch
from transformers import AutoTokenizer

from core.events import CatalogProduct
from core.pretrained import minilm_path
from core.registry import ModelVersion
from core.text import product_text
from trainer.model import PersonalRanker, QueryTower, RankerConfig, load_encoder
from trainer.products import PRODUCT_MAX_LEN

log = structlog.get_logger(__name__)


def load_tower(version: ModelVersion) -> QueryTower:
    """The version's query tower (BERT + mean pooling + L2 norm) as an eager torch module."""
    cfg = RankerConfig.from_dict(version.manifest["config"])
    model = PersonalRanker(cfg, load_encoder(None, cfg.encoder))
    state = torch.load(version.path / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if ".pooler." not in k})  # pooler: unused
    return model.query.eval()


def naive_latencies(version: ModelVersion, queries: Sequence[tuple[str, Sequence[str]]],
                    catalog: Mapping[str, CatalogProduct], warmup: int = 3) -> np.ndarray:
    """Milliseconds per query (tokenize, encode query and 100 products, cosine, sort), one at a time."""
    tower = load_tower(version)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    out = []
    with torch.inference_mode():
        for i, (text, candidates) in enumerate(queries):
            started = time.perf_counter()
            q = tokenizer([text], padding=True, truncation=True, max_length=128, return_tensors="pt")
            p = tokenizer([product_text(catalog[c]) for c in candidates], padding=True, truncation=True,
                          max_length=PRODUCT_MAX_LEN, return_tensors="pt")
            q_emb = tower(q["input_ids"], q["attention_mask"])
            p_emb = tower(p["input_ids"], p["attention_mask"])
            scores = (p_emb @ q_emb[0]).numpy()
            ranked = [candidates[j] for j in np.argsort(-scores, kind="stable")]
            elapsed = (time.perf_counter() - started) * 1000
            if i >= warmup and ranked:
                out.append(elapsed)
    log.info("naive_done", queries=len(out), threads=torch.get_num_threads())
    return np.asarray(out)
