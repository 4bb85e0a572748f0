"""Second stage on a GPU: a cross-encoder re-scores the first stage's top 100 of each query.

The cross-encoder is the same MiniLM (BERT) weights read as one sequence,
``[CLS] query [SEP] product text [SEP]``, with a small head (a linear layer on ``[CLS]``). It
reads every (query, product) pair token by token, so it costs about 100 BERT passes of ~100
word pieces per query: a few milliseconds in fp16 on a data-centre GPU, seconds on a 2-core CPU.
Hence ``SHOPRANK_SCORER_RERANK``: ``cuda`` (the default) runs the stage only when the scorer
serves on CUDA, ``always`` also on a CPU (tests, experiments), ``off`` never.

Honest limits: the stage runs only for a model version that ships ``cross_encoder.onnx`` listed
in its manifest, and the trainer does not train or export one yet, so today the head is untrained
(a seeded linear layer): ``bench/scorer_gpu.py`` uses it to measure what the stage costs, not
what it is worth. Training the head on clicked vs shown pairs is the step before enabling it.

Serving stays torch-free: the graph runs in onnxruntime (CUDA provider, fp16 graph, inputs and
outputs bound on the device with IO binding). Only :func:`build_cross_encoder` and
:func:`export_cross_encoder` import torch, and only when called (export time, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import onnxruntime as ort
import structlog
from tokenizers import Tokenizer

from core.events import Query, RankedResult, ServedFeatures
from core.text import product_text
from features.store import FeatureStore
from scorer.ranking import mark

if TYPE_CHECKING:
    from scorer.ranking import QueryRanker
    from scorer.runtime import ServedModel

log = structlog.get_logger(__name__)

CROSS_ENCODER_FILE = "cross_encoder.onnx"
RERANK_K = 100
RERANK_MAX_LEN = 128  # word pieces of query + product text together
CROSS_INPUTS = ("input_ids", "attention_mask", "token_type_ids")




def pair_tokenizer(tokenizer_path: Path, max_len: int = RERANK_MAX_LEN) -> Tokenizer:
    """The BERT tokenizer set for pairs: ``[CLS] a [SEP] b [SEP]``, longest side cut first."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def pair_inputs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
    """int64 [P, L] input_ids, attention_mask, token_type_ids for (query, product text) pairs."""
    enc = tokenizer.encode_batch(list(pairs))
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


# --- building and exporting (torch, offline) ---------------------------------------------------


def build_cross_encoder(encoder_config: dict[str, Any], encoder_state: dict[str, Any] | None = None,
                        seed: int = 0) -> Any:
    """A torch cross-encoder: BERT from ``encoder_config`` (weights from ``encoder_state``, a
    BertModel state dict, when given) and a linear head on ``[CLS]`` seeded by ``seed``."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    class CrossEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig(**encoder_config), add_pooling_layer=False)
            self.head = nn.Linear(self.bert.config.hidden_size, 1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            return self.head(hidden[:, 0]).squeeze(-1)

    torch.manual_seed(seed)
    model = CrossEncoder()
    if encoder_state is not None:
        model.bert.load_state_dict(encoder_state, strict=False)  # the pooler, absent, is not used
    return model.eval()


def export_cross_encoder(model: Any, path: Path, fp16: bool = False, device: str = "cpu") -> Path:
    """Write ``model`` as an ONNX graph (opset 17, dynamic pairs and length); fp16 weights and
    activations when ``fp16`` (export on ``cuda`` then: half precision is a GPU format here)."""
    import torch

    m = model.to(device)
    m = m.half() if fp16 else m.float()
    example = {k: torch.ones(2, 8, dtype=torch.long, device=device) for k in CROSS_INPUTS}
    example["token_type_ids"][:, 4:] = 1
    dyn = {0: "pairs", 1: "length"}
    with torch.no_grad():
        torch.onnx.export(m, tuple(example[k] for k in CROSS_INPUTS), str(path),
                          input_names=list(CROSS_INPUTS), output_names=["scores"],
                          dynamic_axes={**{k: dyn for k in CROSS_INPUTS}, "scores": {0: "pairs"}},
                          opset_version=17, dynamo=False)
    return path


# --- serving (onnxruntime) -----------------------------------------------------------------------


class CrossEncoderSession:
    """An exported cross-encoder in onnxruntime. On CUDA the inputs are copied to the device once
    and the scores bound there (IO binding), so a batch is one transfer each way."""

    def __init__(self, graph: Path, tokenizer_path: Path, providers: list[str],
                 max_len: int = RERANK_MAX_LEN) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), opts, providers=providers)
        self.cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.tokenizer = pair_tokenizer(tokenizer_path, max_len)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Scores [P] (float32) for tokenized pairs."""
        if not self.cuda:
            return self.session.run(None, feeds)[0].astype(np.float32)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output("scores", "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        return self.run(pair_inputs(self.tokenizer, pairs))


def rerank_allowed(mode: str, device: str) -> bool:
    """Whether ``SHOPRANK_SCORER_RERANK`` lets the stage run on this device (``cpu`` or ``cuda``)."""
    return mode == "always" or (mode == "cuda" and device == "cuda")


class RerankingRanker:
    """A :class:`scorer.ranking.QueryRanker` whose results' top ``k`` are re-ordered by the
    cross-encoder (one batch of pairs per micro-batch of queries). Products past ``k`` keep their
    first-stage order below the re-ranked ones; every product keeps its served features (the
    served matrix's rows are re-ordered with the products)."""

    def __init__(self, inner: QueryRanker, session_for: Callable[[ServedModel], CrossEncoderSession | None],
                 texts: Callable[[list[str]], dict[str, str]], k: int = RERANK_K) -> None:
        self.inner = inner
        self.session_for = session_for
        self.texts = texts
        self.k = k

    def __getattr__(self, name: str) -> Any:  # prepare, store, ...: the first stage's
        return getattr(self.inner, name)

    def rank(self, model: ServedModel, queries: Sequence[tuple[Query, float]]) -> list[RankedResult]:
        results = self.inner.rank(model, queries)
        session = self.session_for(model)
        if session is None:
            return results
        started = mark()
        reranked = self._rerank(session, queries, results)
        self.inner.time_stage("rerank", started)
        return reranked

    def _rerank(self, session: CrossEncoderSession, queries: Sequence[tuple[Query, float]],
                results: list[RankedResult]) -> list[RankedResult]:
        text_of = {q.query_id: q.text for q, _ in queries}
        todo = [r for r in results if not r.error and r.products]
        ids = sorted({p.product_id for r in todo for p in r.products[: self.k]})
        docs = self.texts(ids)
        pairs, spans = [], []
        for r in todo:
            top = r.products[: self.k]
            spans.append((r, len(pairs), len(top)))
            pairs.extend((text_of[r.query_id], docs.get(p.product_id, p.product_id)) for p in top)
        if not pairs:
            return results
        scores = session.score(pairs)
        reranked = {}
        for r, start, n in spans:
            ce = scores[start : start + n]
            order = np.argsort(-ce, kind="stable")
            top = [msgspec.structs.replace(r.products[j], score=float(ce[j])) for j in order]
            rest = list(r.products[n:])
            products = [msgspec.structs.replace(p, position=i) for i, p in enumerate([*top, *rest], 1)]
            reranked[r.query_id] = msgspec.structs.replace(r, products=products,
                                                           features=_reorder(r, order))
        return [reranked.get(r.query_id, r) for r in results]


def _reorder(result: RankedResult, top_order: np.ndarray) -> ServedFeatures | None:
    """The served matrix with its rows in the re-ranked order: its top rows as ``top_order``
    permutes them, the rest unchanged (row i stays the features of product i)."""
    served = result.features
    if served is None:
        return None
    n = len(result.products)
    rows = np.concatenate([top_order, np.arange(len(top_order), n)])
    matrix = served.matrix(n)[rows]
    return ServedFeatures.pack(served.schema, matrix, served.history, served.history_weights)


def store_texts(store: FeatureStore) -> Callable[[list[str]], dict[str, str]]:
    """Product texts from the catalog documents the feature store keeps (the feature workers
    write them as the catalog sends them)."""

    def texts(product_ids: list[str]) -> dict[str, str]:
        return {pid: product_text(p) for pid, p in store.products(product_ids).items()}

    return texts


SessionFor = Callable[["ServedModel"], "CrossEncoderSession | None"]


def version_sessions(registry: Path, providers: list[str]) -> SessionFor:
    """One cross-encoder session per model version (loaded on first use, None when it ships none)."""
    cache: dict[str, CrossEncoderSession | None] = {}

    def session_for(model: ServedModel) -> CrossEncoderSession | None:
        if model.version not in cache:
            folder = registry / model.version
            ships = CROSS_ENCODER_FILE in model.manifest.get("files", {})
            cache[model.version] = (
                CrossEncoderSession(folder / CROSS_ENCODER_FILE, folder / "tokenizer.json", providers)
                if ships else None)
            log.info("rerank_session", model_version=model.version, active=ships, k=RERANK_K)
        return cache[model.version]

    return session_for
