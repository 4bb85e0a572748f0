"""Product embeddings with torch, for training and for the table a version ships.

Products are embedded by the product tower, the pretrained encoder left as it is (the catalog
never has to be re-encoded on every training step). The table and its ids ship inside the version
folder beside the tower itself (``product_encoder.onnx``), which the embedder (onnxruntime, no
torch) runs on products published after training: both read :func:`core.text.product_text`,
truncated to :data:`core.layout.PRODUCT_MAX_LEN` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from core.layout import PRODUCT_MAX_LEN
from core.progress import progress as progress_bar
from trainer.model import QueryTower
from trainer.tokens import pad, token_ids

__all__ = ["PRODUCT_MAX_LEN", "embed_texts"]


def embed_texts(tower: QueryTower, tokenizer: Tokenizer, texts: Sequence[str], max_len: int = PRODUCT_MAX_LEN,
                batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """L2-normalized embeddings [len(texts), D], batched by similar length to pad little."""
    encoded = token_ids(tokenizer, texts, max_len)
    order = np.argsort([len(ids) for ids in encoded])
    out = np.zeros((len(texts), tower.encoder.config.hidden_size), dtype=np.float32)
    tower.eval()
    batches = range(0, len(order), batch_size)
    with torch.no_grad():
        for start in progress_bar(batches, desc="embedding", unit="batch", enabled=progress, leave=False):
            rows = order[start : start + batch_size]
            out[rows] = tower(*pad([encoded[i] for i in rows])).numpy()
    return out
