"""ONNX export of the ranker as two graphs, with dynamic batch, length, candidates and history.

- ``query_encoder.onnx``: input_ids, attention_mask [B, L] -> query_emb [B, D]
- ``ranker_head.onnx``: query_emb [B, D], cand_emb [B, N, D], hist_emb [B, R, D], hist_w [B, R],
  dense [B, N, F] -> scores [B, N]

Two graphs because the scorer needs the query embedding between them: a query without
candidates retrieves its top K from the catalog's embeddings first. The scorer feeds both with
onnxruntime and never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trainer.model import PersonalRanker

ENCODER_FILE = "query_encoder.onnx"
HEAD_FILE = "ranker_head.onnx"
ENCODER_INPUTS = ("input_ids", "attention_mask")
HEAD_INPUTS = ("query_emb", "cand_emb", "hist_emb", "hist_w", "dense")


class _Head(nn.Module):
    """``PersonalRanker.rank`` as a module of its own, so it exports as its own graph."""

    def __init__(self, model: PersonalRanker) -> None:
        super().__init__()
        self.model = model

    def forward(self, query_emb: Tensor, cand_emb: Tensor, hist_emb: Tensor, hist_w: Tensor,
                dense: Tensor) -> Tensor:
        return self.model.rank(query_emb, cand_emb, hist_emb, hist_w, dense)


def example_inputs(model: PersonalRanker, batch: int = 2, length: int = 6, candidates: int = 5,
                   history: int = 3, seed: int = 0) -> dict[str, Tensor]:
    """Random inputs of the graphs' shapes, for tracing and for the torch/onnxruntime check."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    vocab = model.query.encoder.config.vocab_size

    def unit(*shape: int) -> Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return {
        "input_ids": torch.randint(1, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "query_emb": unit(batch, cfg.dim),
        "cand_emb": unit(batch, candidates, cfg.dim),
        "hist_emb": unit(batch, history, cfg.dim),
        "hist_w": torch.rand(batch, history, generator=g),
        "dense": torch.randn(batch, candidates, len(cfg.feature_names), generator=g),
    }


def export_onnx(model: PersonalRanker, folder: Path) -> None:
    """Write both graphs into ``folder`` (opset 17)."""
    model.eval()
    inputs = example_inputs(model)
    seq = {0: "batch", 1: "length"}
    per_cand = {0: "batch", 1: "candidates"}
    per_hist = {0: "batch", 1: "history"}
    with torch.no_grad():
        torch.onnx.export(
            model.query, tuple(inputs[n] for n in ENCODER_INPUTS), str(folder / ENCODER_FILE),
            input_names=list(ENCODER_INPUTS), output_names=["query_emb"],
            dynamic_axes={"input_ids": seq, "attention_mask": seq, "query_emb": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        torch.onnx.export(
            _Head(model), tuple(inputs[n] for n in HEAD_INPUTS), str(folder / HEAD_FILE),
            input_names=list(HEAD_INPUTS), output_names=["scores"],
            dynamic_axes={"query_emb": {0: "batch"}, "cand_emb": per_cand, "hist_emb": per_hist,
                          "hist_w": per_hist, "dense": per_cand, "scores": per_cand},
            opset_version=17, dynamo=False,
        )


def max_abs_difference(model: PersonalRanker, folder: Path, **shape: int) -> float:
    """Largest |torch - onnxruntime| score over both graphs chained, on random inputs."""
    import onnxruntime as ort

    inputs = example_inputs(model, **shape)
    model.eval()
    with torch.no_grad():
        expected = model(*(inputs[n] for n in (*ENCODER_INPUTS, *HEAD_INPUTS[1:]))).numpy()
    cpu = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(folder / ENCODER_FILE), providers=cpu)
    head = ort.InferenceSession(str(folder / HEAD_FILE), providers=cpu)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    query_emb = encoder.run(None, {n: feeds[n] for n in ENCODER_INPUTS})[0]
    head_feeds = {n: feeds[n] for n in HEAD_INPUTS[1:]} | {"query_emb": query_emb}
    got = head.run(None, head_feeds)[0]
    return float(np.max(np.abs(expected - got)))
