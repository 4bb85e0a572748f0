"""ONNX export of the ranker with dynamic batch, query length, candidates and history.

The graph's inputs are :class:`trainer.model.PersonalRanker.forward`'s arguments; the scorer feeds
them with onnxruntime and never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.model import PersonalRanker

INPUTS = ("input_ids", "attention_mask", "cand_emb", "hist_emb", "hist_w", "dense")
OUTPUT = "scores"
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "length"},
    "attention_mask": {0: "batch", 1: "length"},
    "cand_emb": {0: "batch", 1: "candidates"},
    "hist_emb": {0: "batch", 1: "history"},
    "hist_w": {0: "batch", 1: "history"},
    "dense": {0: "batch", 1: "candidates"},
    OUTPUT: {0: "batch", 1: "candidates"},
}


def example_inputs(model: PersonalRanker, batch: int = 2, length: int = 6, candidates: int = 5,
                   history: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the graph's shapes, for tracing and for the torch/onnxruntime check."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    vocab = model.query.encoder.config.vocab_size
    emb = torch.nn.functional.normalize(torch.randn(batch, candidates, cfg.dim, generator=g), dim=-1)
    hist = torch.nn.functional.normalize(torch.randn(batch, history, cfg.dim, generator=g), dim=-1)
    return {
        "input_ids": torch.randint(1, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "cand_emb": emb,
        "hist_emb": hist,
        "hist_w": torch.rand(batch, history, generator=g),
        "dense": torch.randn(batch, candidates, len(cfg.feature_names), generator=g),
    }


def export_onnx(model: PersonalRanker, path: Path) -> None:
    """Trace the model into ``path`` (opset 17, dynamic axes)."""
    model.eval()
    inputs = example_inputs(model)
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(inputs[name] for name in INPUTS),
            str(path),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=17,
            dynamo=False,
        )


def max_abs_difference(model: PersonalRanker, onnx_path: Path, **shape: int) -> float:
    """Largest |torch - onnxruntime| score on random inputs: the export check."""
    import onnxruntime as ort

    inputs = example_inputs(model, **shape)
    model.eval()
    with torch.no_grad():
        expected = model(*(inputs[name] for name in INPUTS)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.max(np.abs(expected - got)))
