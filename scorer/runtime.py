"""A loaded model version served with onnxruntime: tokenizer, graph, product embeddings.

CUDA provider on a GPU, CPU provider elsewhere, chosen by ``Settings.scorer.device``. Loading
verifies the version's files against its manifest (core.registry) and warms the session, so a
version that cannot score never replaces one that can.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog
from tokenizers import Tokenizer

from core.registry import ModelVersion, load_version
from features.read import FEATURE_NAMES

log = structlog.get_logger(__name__)

ENCODER_FILE = "query_encoder.onnx"
HEAD_FILE = "ranker_head.onnx"
TOKENIZER_FILE = "tokenizer.json"
PRODUCT_EMB_FILE = "product_emb.npy"
PRODUCT_IDS_FILE = "product_ids.json"
# Query embeddings kept per loaded version (LRU, ~1.5 KB each at 384 dims). Search traffic repeats
# its head queries (in the Best Buy log ~85% of searches repeat an earlier text), and the encoder
# is most of a query's model cost on a CPU. A swap loads a new ServedModel, so a new, empty cache.
QUERY_CACHE_SIZE = 10_000


def choose_providers(device: str) -> list[str]:
    """``cuda`` demands the CUDA provider; ``auto`` takes it when onnxruntime can use a GPU."""
    available = ort.get_available_providers()
    # onnxruntime-gpu lists its CUDA provider even on machines without a GPU: look for the device.
    gpu_present = Path("/dev/nvidiactl").exists()
    wants_gpu = device == "cuda" or (device == "auto" and gpu_present)
    if wants_gpu and "CUDAExecutionProvider" in available:
        try:
            ort.preload_dlls()  # the CUDA/cuDNN libraries that torch's wheels bring
        except Exception as exc:  # any failure here means: no usable GPU
            if device == "cuda":
                raise RuntimeError(f"CUDA requested but its libraries do not load: {exc}") from exc
            return ["CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"CUDA requested but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


@dataclass
class Batch:
    """Inputs for a batch of queries, padded to one shape. ``n_candidates`` un-pads the scores."""

    query_emb: np.ndarray  # [B, D] from ``ServedModel.encode``
    cand_idx: np.ndarray  # [B, N] rows of the embedding table (the last row is all zeros)
    hist_idx: np.ndarray  # [B, R]
    hist_w: np.ndarray  # [B, R]
    dense: np.ndarray  # [B, N, F]
    n_candidates: list[int]
    candidates: list[list[str]] = field(default_factory=list)  # the product ids, when known


class ServedModel:
    """One model version, ready to score. Thread-compatible: one ``score`` call at a time."""

    def __init__(self, version: ModelVersion, device: str = "auto", threads: int = 0) -> None:
        self.version = version.version
        self.manifest = version.manifest
        cfg = version.manifest["config"]
        self.feature_names: tuple[str, ...] = tuple(cfg["feature_names"])
        self.max_query_len: int = cfg["max_query_len"]
        self.history_len: int = cfg["history_len"]
        self.providers = choose_providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: the scorer shares its cores with its own
        # Kafka/Redis client threads (and, on small hosts, the broker); spinning threads starved them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(str(version.path / ENCODER_FILE), opts, providers=self.providers)
        self.head = ort.InferenceSession(str(version.path / HEAD_FILE), opts, providers=self.providers)
        self.tokenizer = Tokenizer.from_file(str(version.path / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(self.max_query_len)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        emb = np.load(version.path / PRODUCT_EMB_FILE).astype(np.float32)
        self.product_emb = np.vstack([emb, np.zeros((1, emb.shape[1]), np.float32)])
        self.product_ids: list[str] = json.loads((version.path / PRODUCT_IDS_FILE).read_text())
        self.product_index = {pid: i for i, pid in enumerate(self.product_ids)}
        self.unknown_row = len(self.product_ids)
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()  # the HTTP API encodes beside the Kafka loop
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def device(self) -> str:
        return "cuda" if self.head.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def rows(self, product_ids: list[str]) -> np.ndarray:
        """Embedding-table rows of ``product_ids``; unknown products map to the zero row."""
        return np.fromiter((self.product_index.get(p, self.unknown_row) for p in product_ids),
                           dtype=np.int64, count=len(product_ids))

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalized query embeddings [B, D]; each distinct text not in the cache is encoded once."""
        out = np.empty((len(texts), self.product_emb.shape[1]), np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, text in enumerate(texts):
                cached = self._query_cache.get(text)
                if cached is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._query_cache.move_to_end(text)
                    out[i] = cached
            self.cache_hits += len(texts) - sum(len(rows) for rows in missing.values())
            self.cache_misses += len(missing)
        if missing:
            fresh = self._encode(list(missing))
            with self._cache_lock:
                for (text, rows), emb in zip(missing.items(), fresh, strict=True):
                    out[rows] = emb
                    self._query_cache[text] = emb.copy()  # not a view pinning the batch
                while len(self._query_cache) > QUERY_CACHE_SIZE:
                    self._query_cache.popitem(last=False)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def retrieve(self, query_emb: np.ndarray, k: int) -> np.ndarray:
        """Rows [B, k] of the k catalog products closest to each query (cosine)."""
        sims = query_emb @ self.product_emb[:-1].T
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        return np.take_along_axis(top, order, axis=1)

    def score(self, batch: Batch) -> list[np.ndarray]:
        """Scores per query, each the length of that query's candidates."""
        feeds = {
            "query_emb": batch.query_emb.astype(np.float32),
            "cand_emb": self.product_emb[batch.cand_idx],
            "hist_emb": self.product_emb[batch.hist_idx],
            "hist_w": batch.hist_w.astype(np.float32),
            "dense": batch.dense.astype(np.float32),
        }
        scores = self.head.run(None, feeds)[0]
        return [scores[i, :n] for i, n in enumerate(batch.n_candidates)]


def load_served_model(registry: Path, version: str, device: str = "auto", threads: int = 0) -> ServedModel:
    """Verify, load and warm a version; raises when any of that fails."""
    model = ServedModel(load_version(registry, version), device=device, threads=threads)
    if model.feature_names != FEATURE_NAMES:
        # Its input layout differs from what features.read builds: every query would fail.
        differ = sorted(set(FEATURE_NAMES) ^ set(model.feature_names)) or ["their order"]
        raise RuntimeError(f"model {version} reads {len(model.feature_names)} features, this code serves "
                           f"{len(FEATURE_NAMES)} (differing: {', '.join(differ)}): retrain it")
    warm = Batch(query_emb=model.encode(["warm up"]), cand_idx=np.zeros((1, 2), np.int64),
                 hist_idx=np.full((1, 1), model.unknown_row, np.int64), hist_w=np.zeros((1, 1), np.float32),
                 dense=np.zeros((1, 2, len(model.feature_names)), np.float32), n_candidates=[2])
    scores = model.score(warm)[0]
    if not np.all(np.isfinite(scores)):
        raise RuntimeError(f"model {version} produced non-finite scores on warm-up")
    log.info("model_loaded", model_version=version, device=model.device, providers=model.providers)
    return model
