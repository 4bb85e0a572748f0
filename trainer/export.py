"""ONNX export of the ranker as three graphs, with dynamic batch, length, candidates and history.

- ``query_encoder.onnx``: input_ids, attention_mask [B, L] -> query_emb [B, D]
- ``ranker_head.onnx``: query_emb [B, D], cand_emb [B, N, D], hist_emb [B, R, D], hist_w [B, R],
  dense [B, N, F] -> scores [B, N]
- ``product_encoder.onnx``: input_ids, attention_mask [B, L] -> product_emb [B, D], the product
  tower: the encoder as it was when it embedded the version's products (the pretrained weights),
  so a product published later is embedded the same way (``shoprank embedder``)

The query encoder is served as exported (``fp32``) or quantized (``int8``:
``SHOPRANK_MODEL_QUERY_ENCODER_PRECISION``, :func:`quantize_query_encoder`): dynamic int8 weights
per output channel on its MatMuls, 2.5x less CPU per query on an AVX2 host, kept only when its
embeddings of the version's own queries agree with the exported graph's (cosine), and recorded in
the manifest. Every figure of a version (its query table, the harness's MAP@5) comes from the
encoder it serves.

Two ranking graphs because the scorer needs the query embedding between them: a query without
candidates retrieves its top K from the catalog's embeddings first. The scorer and the embedder
run them with onnxruntime and never import torch. :func:`write_version_files` writes everything a
version folder holds (names in :mod:`core.layout`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import Tensor, nn

from core import layout
from core.layout import ENCODER_INPUTS
from scorer.runtime import encode_texts, query_tokenizer, write_query_table
from trainer.model import PersonalRanker, QueryTower

log = structlog.get_logger(__name__)

HEAD_INPUTS = ("query_emb", "cand_emb", "hist_emb", "hist_w", "dense")
# An int8 query encoder is kept when its embeddings of the version's queries agree with the
# exported graph's by at least this mean cosine. Best Buy's fine-tuned encoder: 0.991 (least
# 0.983), and MAP@5 0.7967 against 0.7972 in fp32 (docs/scorer-cost.md).
INT8_MIN_MEAN_COSINE = 0.98
AGREEMENT_TEXTS = 500  # the most frequent queries the agreement is measured on


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
    """Write the query encoder and the head into ``folder`` (opset 17)."""
    model.eval()
    inputs = example_inputs(model)
    seq = {0: "batch", 1: "length"}
    per_cand = {0: "batch", 1: "candidates"}
    per_hist = {0: "batch", 1: "history"}
    with torch.no_grad():
        torch.onnx.export(
            model.query, tuple(inputs[n] for n in ENCODER_INPUTS), str(folder / layout.QUERY_ENCODER),
            input_names=list(ENCODER_INPUTS), output_names=["query_emb"],
            dynamic_axes={"input_ids": seq, "attention_mask": seq, "query_emb": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        torch.onnx.export(
            _Head(model), tuple(inputs[n] for n in HEAD_INPUTS), str(folder / layout.RANKER_HEAD),
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
    encoder = ort.InferenceSession(str(folder / layout.QUERY_ENCODER), providers=cpu)
    head = ort.InferenceSession(str(folder / layout.RANKER_HEAD), providers=cpu)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    query_emb = encoder.run(None, {n: feeds[n] for n in ENCODER_INPUTS})[0]
    head_feeds = {n: feeds[n] for n in HEAD_INPUTS[1:]} | {"query_emb": query_emb}
    got = head.run(None, head_feeds)[0]
    return float(np.max(np.abs(expected - got)))


def export_product_tower(tower: QueryTower, folder: Path) -> Path:
    """The product tower as ``product_encoder.onnx`` (opset 17). Exporting the same weights gives
    the same bytes, so versions whose products the pretrained encoder embedded share one tower."""
    path = folder / layout.PRODUCT_ENCODER
    g = torch.Generator().manual_seed(0)
    vocab = tower.encoder.config.vocab_size
    ids = torch.randint(1, vocab, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    seq = {0: "batch", 1: "length"}
    tower.eval()
    with torch.no_grad():
        torch.onnx.export(
            tower, (ids, mask), str(path), input_names=list(ENCODER_INPUTS), output_names=["product_emb"],
            dynamic_axes={"input_ids": seq, "attention_mask": seq, "product_emb": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    return path


def tower_difference(tower: QueryTower, path: Path, batch: int = 3, length: int = 9) -> float:
    """Largest |torch - onnxruntime| over random padded inputs of the product tower."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, tower.encoder.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded row: pooling must ignore its padding
    tower.eval()
    with torch.no_grad():
        expected = tower(ids, mask).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.max(np.abs(expected - got)))


def write_version_files(folder: Path, model: PersonalRanker, product_tower: QueryTower | Path | None,
                        product_ids: list[str], product_emb: np.ndarray, tokenizer: Path,
                        tolerance: float = 1e-3, queries: Sequence[str] = (),
                        encoder_precision: str = "fp32") -> dict[str, object]:
    """Everything a version folder holds but its manifest: the three graphs (each checked
    against torch), the product table, the tokenizer, the torch weights, and the query table: ``queries``
    (scorer.runtime.head_queries of the texts it trained on) embedded by its served query
    encoder (scorer.runtime.QueryTable). Returns what the manifest says of the query encoder
    (:func:`quantize_query_encoder`; ``encoder_precision`` "int8" asks for it).

    ``product_tower`` is the encoder that embedded ``product_emb``, or the ``product_encoder.onnx``
    of the version it came from (copied byte for byte: same tower, same embeddings in Redis); None
    ships none (the version then serves its own table only).
    """
    export_onnx(model, folder)
    diff = max_abs_difference(model, folder, batch=3, length=7, candidates=11, history=4)
    if not diff <= tolerance:  # NaN weights give a NaN difference: refused too
        raise RuntimeError(f"onnxruntime and torch disagree by {diff:.2e} (> {tolerance})")
    if isinstance(product_tower, Path):
        shutil.copyfile(product_tower, folder / layout.PRODUCT_ENCODER)
    elif product_tower is not None:
        diff = tower_difference(product_tower, export_product_tower(product_tower, folder))
        if not diff <= tolerance:
            raise RuntimeError(f"product tower: onnxruntime and torch disagree by {diff:.2e} (> {tolerance})")
    if len(product_ids) != len(product_emb):
        raise ValueError(f"{len(product_ids)} product ids for {len(product_emb)} embeddings")
    table = np.asarray(product_emb, np.float32).reshape(len(product_ids), model.cfg.dim)
    np.save(folder / layout.PRODUCT_EMB, table)
    (folder / layout.PRODUCT_IDS).write_text(json.dumps(list(product_ids)))
    shutil.copy(tokenizer, folder / layout.TOKENIZER)
    encoder = {"precision": "fp32"}
    if encoder_precision == "int8":
        encoder = quantize_query_encoder(folder, list(queries[:AGREEMENT_TEXTS]), model.cfg.max_query_len)
    if queries:
        write_query_table(folder, list(queries), model.cfg.max_query_len)
    torch.save(model.state_dict(), folder / layout.WEIGHTS)
    return encoder


class _BelowWarning(logging.Filter):
    """Drops records under WARNING logged on the logger it filters (a logger's filters do not see
    what its children propagate to it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quantize_query_encoder(folder: Path, texts: list[str], max_len: int) -> dict[str, object]:
    """Replace ``folder``'s exported query encoder by its dynamic int8 quantization (weights per
    output channel, MatMuls only: the embedding tables and layer norms stay float) when its
    embeddings of ``texts`` agree with the exported graph's by :data:`INT8_MIN_MEAN_COSINE`;
    else keep the exported one. Returns the manifest's account: precision and agreement."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not texts:
        return {"precision": "fp32", "reason": "no queries to measure an int8 encoder's agreement on"}
    exported, quantized = folder / layout.QUERY_ENCODER, folder / f"{layout.QUERY_ENCODER}.int8"
    # It logs each tensor it leaves in float (48 lines) at INFO on the root logger itself; only
    # those are dropped, not what other loggers and threads say meanwhile, nor its warnings.
    quiet = _BelowWarning()
    logging.root.addFilter(quiet)
    try:
        quantize_dynamic(exported, quantized, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    finally:
        logging.root.removeFilter(quiet)
    tokenizer = query_tokenizer(folder / layout.TOKENIZER, None, max_len)
    cpu = ["CPUExecutionProvider"]
    a, b = (encode_texts(ort.InferenceSession(str(p), providers=cpu), tokenizer, texts)
            for p in (exported, quantized))
    cosine = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    agreement = {"texts": len(texts), "mean_cosine": round(float(cosine.mean()), 4),
                 "min_cosine": round(float(cosine.min()), 4)}
    if not cosine.mean() >= INT8_MIN_MEAN_COSINE:  # NaN refused too
        quantized.unlink()
        log.warning("int8_query_encoder_refused", **agreement, floor=INT8_MIN_MEAN_COSINE)
        return {"precision": "fp32", "int8_refused": agreement}
    quantized.replace(exported)
    return {"precision": "int8", "quantization": "dynamic, per channel, MatMul", "agreement": agreement}
