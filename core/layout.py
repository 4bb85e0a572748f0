"""What a model version folder holds, named once: the trainer writes these files, the scorer and
the embedder read them (the registry, :mod:`core.registry`, keeps the manifest beside them).

The product tower is the encoder that embedded the version's products. A version ships it as
``product_encoder.onnx`` so products published after training are embedded the same way (by
``shoprank embedder``, into Redis). Versions whose product tower is the same file share one
tower id, so they share those embeddings: fine-tuning the query side and the head does not
re-embed the catalog. No torch here: the scorer imports this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

QUERY_ENCODER: Final = "query_encoder.onnx"  # input_ids, attention_mask [B, L] -> query_emb [B, D]
PRODUCT_ENCODER: Final = "product_encoder.onnx"  # input_ids, attention_mask [B, L] -> product_emb [B, D]
RANKER_HEAD: Final = "ranker_head.onnx"  # query, candidate and history embeddings, dense -> scores
TOKENIZER: Final = "tokenizer.json"  # HF tokenizers file, shared by both encoders
PRODUCT_EMB: Final = "product_emb.npy"  # float32 [products, D], the products known at training
PRODUCT_IDS: Final = "product_ids.json"  # their ids, in row order
QUERY_EMB: Final = "query_emb.npy"  # float32 [queries, D]: the query encoder's output for ...
QUERY_TEXTS: Final = "query_texts.json"  # ... these texts of its training queries (encoder keys)
WEIGHTS: Final = "weights.pt"  # the torch state dict (fine-tuning continues from it)
ENCODER_INPUTS: Final = ("input_ids", "attention_mask")

#: Tokens of product text the product tower reads (title, brand, categories, start of description).
PRODUCT_MAX_LEN: Final = 64


@dataclass(frozen=True)
class ProductTowerSpec:
    """How a version embeds products. ``id`` names the tower's embeddings in Redis."""

    id: str
    max_len: int


def product_tower(manifest: Mapping[str, Any]) -> ProductTowerSpec | None:
    """The version's product tower, or None for a version that ships none (trained before towers
    shipped: it serves its own table only).

    The id is the first 16 hex digits of sha256 over the graph's sha256 (from the manifest,
    verified on load) and the token limit: the same graph reading the same tokens gives the same
    vectors, whatever version ships it.
    """
    sha = manifest.get("files", {}).get(PRODUCT_ENCODER)
    if not sha:
        return None
    max_len = int(manifest.get("product_tower", {}).get("max_len", PRODUCT_MAX_LEN))
    return ProductTowerSpec(hashlib.sha256(f"{sha}:{max_len}".encode()).hexdigest()[:16], max_len)
