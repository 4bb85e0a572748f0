"""A loaded model version served with onnxruntime: tokenizer, graphs, the product table.

CUDA provider on a GPU, CPU provider elsewhere, chosen by ``Settings.scorer.device``. Loading
verifies the files it reads against the version's manifest (core.registry) and warms the
session, so a version that cannot score never replaces one that can.

The product table is the version's shipped rows (the products known at training), overlaid and
extended by the vectors the embedder wrote to Redis for the version's product tower
(:mod:`features.embeddings`): every product the catalog has, including those published after
training. A refresher thread follows the change feed (every ``embeddings_refresh_s``) and
publishes a new :class:`ProductTable` for each change it reads; a table is never modified once
published (new products go to rows no published table covers; an edited product gets a new row
and its old row is left out of retrieval), and a product's row never moves. Each call reads one
table, and rows stay valid in every later table, so a batch whose steps straddle a refresh still
reads valid rows: at worst, a product edited meanwhile is scored with its newer vector.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import redis
import structlog
from cachetools import LRUCache
from prometheus_client import Counter as PromCounter
from tokenizers import Tokenizer

from core import layout
from core.registry import ModelVersion, load_version
from features.embeddings import Cursor, FeedGap, ProductEmbeddings
from features.read import FEATURE_NAMES

log = structlog.get_logger(__name__)

# Query embeddings kept per loaded version (LRU, ~1.5 KB each at 384 dims). Search traffic repeats
# its head queries (in the Best Buy log ~85% of searches repeat an earlier text), and the encoder
# is most of a query's model cost on a CPU. A swap loads a new ServedModel, so a new cache (that
# starts with the old one's entries when the query side is the same: adopt_query_cache).
QUERY_CACHE_SIZE = 10_000
# Lookups of every loaded version's cache, on the process-wide registry (the scorer's /metrics
# serves it), as the speller's cache counts its own.
_QUERY_CACHE_LOOKUPS = PromCounter("shoprank_query_cache_lookups", "Query embedding cache lookups, by result",
                               ["result"])
_CACHE_HITS, _CACHE_MISSES = _QUERY_CACHE_LOOKUPS.labels("hit"), _QUERY_CACHE_LOOKUPS.labels("miss")
_SHIPPED_HITS = _QUERY_CACHE_LOOKUPS.labels("shipped")  # found in the version's own query table
UNKNOWN_ROW = -1  # the row of a product without a vector: always the zero vector
# A vector from Redis this close to the row served is that row (the shipped table was computed
# by torch, the embedder's by onnxruntime: they differ by ~1e-7), not an edit needing a new row.
SAME_VECTOR = 1e-5
# The files a scorer reads from a version, the only ones it verifies on load (the torch weights
# and the product tower are the trainer's and the embedder's: 180 MB of hashing saved per swap).
SERVED_FILES = (layout.QUERY_ENCODER, layout.RANKER_HEAD, layout.TOKENIZER, layout.PRODUCT_EMB,
                layout.PRODUCT_IDS)
# ... and the version's query table, which versions written before it lack (see QueryTable).
SERVED_OPTIONAL = (layout.QUERY_EMB, layout.QUERY_TEXTS)
# Query tokenizers kept for the versions a swap loads next (a few MB each; see query_tokenizer).
TOKENIZERS_KEPT = 4
_tokenizers: OrderedDict[tuple[str, int], Tokenizer] = OrderedDict()
_tokenizers_lock = threading.Lock()


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
    cand_idx: np.ndarray  # [B, N] rows of the product table (``ServedModel.unknown_row``: none)
    hist_idx: np.ndarray  # [B, R]
    hist_w: np.ndarray  # [B, R]
    dense: np.ndarray  # [B, N, F]
    n_candidates: list[int]
    candidates: list[list[str]] = field(default_factory=list)  # the product ids, when known


@dataclass(frozen=True)
class ProductTable:
    """Product vectors by row, published whole. ``buf[0]`` is the zero vector (row -1, unknown
    products) and ``buf[r + 1]`` row ``r``; rows ``n`` and up are not this table's (a later one
    may have filled them). ``ids[r]`` is row ``r``'s product: the list is shared and only grows,
    so it may be longer than ``n``. ``stale``: rows an edit replaced, never retrieved."""

    buf: np.ndarray
    n: int
    ids: list[str]
    stale: np.ndarray  # int64 rows, sorted

    @property
    def live(self) -> int:
        return self.n - len(self.stale)

    def vectors(self) -> np.ndarray:
        return self.buf[1 : self.n + 1]


@dataclass(frozen=True)
class EmbeddingSource:
    """Where the versions a scorer loads find the vectors of products published after training."""

    client: redis.Redis
    refresh_s: float = 1.0


class ServedModel:
    """One model version, ready to score. Thread-compatible: one ``score`` call at a time.

    ``embeddings``: read the version's product tower's vectors from Redis, and follow them
    (a thread, stopped when the model is dropped or :meth:`close` d); None: shipped rows only.
    """

    unknown_row = UNKNOWN_ROW

    def __init__(self, version: ModelVersion, device: str = "auto", threads: int = 0,
                 embeddings: EmbeddingSource | None = None) -> None:
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
        self.threads = threads  # swapped-in versions load with the same
        path = version.path
        self.encoder = ort.InferenceSession(str(path / layout.QUERY_ENCODER), opts, providers=self.providers)
        self.head = ort.InferenceSession(str(path / layout.RANKER_HEAD), opts, providers=self.providers)
        self.tokenizer = query_tokenizer(path / layout.TOKENIZER,
                                         version.manifest.get("files", {}).get(layout.TOKENIZER),
                                         self.max_query_len)
        shipped = np.load(path / layout.PRODUCT_EMB).astype(np.float32)
        self.dim = int(cfg.get("dim") or shipped.shape[1])
        shipped = shipped.reshape(-1, self.dim)
        shipped_ids: list[str] = json.loads((path / layout.PRODUCT_IDS).read_text())
        self.tower = layout.product_tower(version.manifest)
        self.embedding_source = embeddings
        self._store = (ProductEmbeddings(embeddings.client, self.tower.id)
                       if embeddings is not None and self.tower is not None else None)
        self._cursor = Cursor()
        self._refresh_lock = threading.Lock()  # one writer of tables at a time
        self.product_index: dict[str, int] = {}
        self._table = self._initial_table(shipped_ids, shipped)
        self.queries = QueryTable.load(path, self.dim)
        self._query_cache: LRUCache[str, np.ndarray] = LRUCache(maxsize=QUERY_CACHE_SIZE)
        self._cache_lock = threading.Lock()  # the HTTP API encodes beside the Kafka loop
        self.cache_hits = 0  # the LRU's and the query table's
        self.cache_misses = 0
        self._stop = threading.Event()
        if self._store is not None and embeddings is not None:
            _start_refresher(self, embeddings.refresh_s)

    # --- the product table --------------------------------------------------------------------

    @property
    def table(self) -> ProductTable:
        return self._table

    @property
    def product_ids(self) -> list[str]:
        """Row -> product id (rows of retrieval results index it)."""
        return self._table.ids

    @property
    def product_emb(self) -> np.ndarray:
        """The current table's vectors [rows, D] (stale rows included)."""
        return self._table.vectors()

    def _initial_table(self, shipped_ids: list[str], shipped: np.ndarray) -> ProductTable:
        ids = list(shipped_ids)
        vectors = [shipped]
        index = {p: i for i, p in enumerate(ids)}
        if self._store is not None:
            stored = self._store.load()
            self._cursor = stored.cursor
            if stored.ids and stored.vectors.shape[1] != self.dim:
                log.error("product_embeddings_ignored", model_version=self.version, tower=self._store.tower,
                          reason=f"{stored.vectors.shape[1]} dims in Redis, the model has {self.dim}")
            elif stored.ids:
                fresh = []
                for pid, vec in zip(stored.ids, stored.vectors, strict=True):
                    row = index.get(pid)
                    if row is not None:
                        shipped[row] = vec  # nothing reads this table yet: overlay in place
                    else:
                        index[pid] = len(ids)
                        ids.append(pid)
                        fresh.append(vec)
                if fresh:
                    vectors.append(np.vstack(fresh))
            log.info("product_embeddings_loaded", model_version=self.version, tower=self._store.tower,
                     stored=len(stored.ids), shipped=len(shipped_ids), rows=len(ids))
        n = len(ids)
        buf = np.zeros((n + 1, self.dim), np.float32)
        if n:
            buf[1:] = np.vstack(vectors)
        self.product_index = index
        return ProductTable(buf, n, ids, np.zeros(0, np.int64))

    def refresh(self) -> int:
        """Read the vectors changed since the last refresh and publish a table with them; returns
        how many rows were added. A trimmed feed (this scorer fell far behind) reloads them all."""
        if self._store is None:
            return 0
        with self._refresh_lock:
            try:
                rows = self._store.changes(self._cursor)
            except FeedGap as exc:
                log.warning("product_embeddings_reload", model_version=self.version, reason=str(exc))
                rows = self._store.load()
            self._cursor = rows.cursor
            if not rows.ids:
                return 0
            if rows.vectors.shape[1] != self.dim:
                log.error("product_embeddings_ignored", model_version=self.version, tower=self._store.tower,
                          reason=f"{rows.vectors.shape[1]} dims in Redis, the model has {self.dim}")
                return 0
            return self._append(rows.ids, rows.vectors)

    def _append(self, product_ids: list[str], vectors: np.ndarray) -> int:
        """Publish a table with these vectors: new rows for new or changed products."""
        t = self._table
        fresh: dict[str, np.ndarray] = {}
        stale: list[int] = []
        for pid, vec in zip(product_ids, vectors, strict=True):
            row = self.product_index.get(pid)
            if row is not None and float(np.max(np.abs(t.buf[row + 1] - vec))) <= SAME_VECTOR:
                continue  # served already: read at load and again from the feed, or shipped (torch)
            if row is not None:
                stale.append(row)
            fresh[pid] = vec
        if not fresh:
            return 0
        n = t.n + len(fresh)
        buf = t.buf
        if n + 1 > len(buf):  # grow into a new buffer; tables already published keep the old one
            buf = np.zeros((max(n + 1, 2 * len(t.buf), 1024), self.dim), np.float32)
            buf[: t.n + 1] = t.buf[: t.n + 1]
        buf[t.n + 1 : n + 1] = np.vstack(list(fresh.values()))  # rows no published table covers
        t.ids.extend(fresh)  # ids only grows: earlier tables still map their rows the same
        stale_rows = np.union1d(t.stale, np.asarray(stale, np.int64)) if stale else t.stale
        self._table = ProductTable(buf, n, t.ids, stale_rows)
        for r, pid in enumerate(fresh, start=t.n):  # after publishing: an index row is always in the table
            self.product_index[pid] = r
        log.info("product_embeddings_refreshed", model_version=self.version, added=len(fresh) - len(stale),
                 edited=len(stale), rows=n)
        return len(fresh)

    def close(self) -> None:
        """Stop following Redis (a dropped model stops by itself)."""
        self._stop.set()

    # --- the query cache ---------------------------------------------------------------------

    @property
    def query_side(self) -> tuple[str, str, int, tuple[str, ...]] | None:
        """What a query's embedding depends on: the query encoder's and tokenizer's hashes, the
        query length, the providers (None when the manifest lacks the hashes)."""
        files = self.manifest.get("files", {})
        encoder, tokenizer = files.get(layout.QUERY_ENCODER), files.get(layout.TOKENIZER)
        if not encoder or not tokenizer:
            return None
        return encoder, tokenizer, self.max_query_len, tuple(self.providers)

    def adopt_query_cache(self, other: ServedModel) -> int:
        """Take ``other``'s cached query embeddings when they are this version's too (the same query
        side: a version that changed only its head, e.g. zero-shot versions or a head retrained);
        returns how many. Otherwise the cache starts empty: every query text is encoded again,
        which doubled p50 when versions swapped every 2.5 s (``make bench-swap``)."""
        if self.query_side is None or self.query_side != other.query_side:
            return 0
        with other._cache_lock:  # in the order they were cached (cachetools keeps recency to itself)
            entries = list(other._query_cache.items())
        with self._cache_lock:
            entries.extend(self._query_cache.items())  # this version's own (its warm-up) last
            cache: LRUCache[str, np.ndarray] = LRUCache(maxsize=QUERY_CACHE_SIZE)
            for text, emb in entries[-QUERY_CACHE_SIZE:]:
                cache[text] = emb
            self._query_cache = cache
            return len(cache)

    # --- scoring -----------------------------------------------------------------------------

    @property
    def feature_means(self) -> np.ndarray:
        """Each feature's training mean (the manifest's ``feature_mean``; zeros when it has none):
        what the head reads as "nothing known" (the explain API's and sim.ablation's reference)."""
        return np.asarray(self.manifest.get("feature_mean", np.zeros(len(self.feature_names))), np.float32)

    @property
    def device(self) -> str:
        return "cuda" if self.head.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def rows(self, product_ids: list[str]) -> np.ndarray:
        """Table rows of ``product_ids``; products without a vector map to ``unknown_row`` (zeros)."""
        index = self.product_index
        return np.fromiter((index.get(p, UNKNOWN_ROW) for p in product_ids), dtype=np.int64,
                           count=len(product_ids))

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalized query embeddings [B, D]. A text is looked up by its :func:`encoder_key` in
        the version's query table, then in the LRU; each distinct one in neither is encoded once."""
        out = np.empty((len(texts), self.dim), np.float32)
        missing: dict[str, list[int]] = {}
        shipped = 0
        table = self.queries
        with self._cache_lock:
            for i, text in enumerate(texts):
                key = encoder_key(self.tokenizer, text)
                row = table.rows.get(key)
                if row is not None:
                    out[i] = table.emb[row]
                    shipped += 1
                    continue
                cached = self._query_cache.get(key)  # a hit becomes the most recently used
                if cached is None:
                    missing.setdefault(key, []).append(i)
                else:
                    out[i] = cached
            hits = len(texts) - sum(len(rows) for rows in missing.values())
            self.cache_hits += hits
            self.cache_misses += len(missing)
        _SHIPPED_HITS.inc(shipped)
        _CACHE_HITS.inc(hits - shipped)
        _CACHE_MISSES.inc(len(missing))
        if missing:
            fresh = encode_texts(self.encoder, self.tokenizer, list(missing))
            with self._cache_lock:
                for (key, rows), emb in zip(missing.items(), fresh, strict=True):
                    out[rows] = emb
                    self._query_cache[key] = emb.copy()  # not a view pinning the batch; LRU out
        return out

    def retrieve(self, query_emb: np.ndarray, k: int) -> np.ndarray:
        """Rows [B, k] of the k catalog products closest to each query (cosine); fewer columns
        when the table holds fewer than k products."""
        t = self._table
        k = min(k, t.live)
        if k <= 0:
            return np.zeros((len(query_emb), 0), np.int64)
        sims = query_emb @ t.vectors().T
        if len(t.stale):
            sims[:, t.stale] = -np.inf  # replaced by an edit: the product's newer row stands for it
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        return np.take_along_axis(top, order, axis=1)

    def score(self, batch: Batch) -> list[np.ndarray]:
        """Scores per query, each the length of that query's candidates."""
        buf = self._table.buf  # row r is buf[r + 1]; unknown_row (-1) is buf[0], the zero vector
        feeds = {  # asarray: no copy of what is float32 already
            "query_emb": np.asarray(batch.query_emb, np.float32),
            "cand_emb": buf[batch.cand_idx + 1],
            "hist_emb": buf[batch.hist_idx + 1],
            "hist_w": np.asarray(batch.hist_w, np.float32),
            "dense": np.asarray(batch.dense, np.float32),
        }
        scores = self.head.run(None, feeds)[0]
        return [scores[i, :n] for i, n in enumerate(batch.n_candidates)]


def encoder_key(tokenizer: Tokenizer, text: str) -> str:
    """The form of ``text`` the query encoder reads: the tokenizer's own normalization (MiniLM's
    lowercases and strips accents), whitespace runs as one space. It splits into the same tokens
    as ``text``, so "Xbox  360" and "xbox 360" share one cached embedding."""
    normalizer = tokenizer.normalizer
    return " ".join((normalizer.normalize_str(text) if normalizer is not None else text).split())


def encode_texts(encoder: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """The query encoder's embeddings [len(texts), D] of ``texts``, one run each and unpadded: an
    int8 encoder (trainer.export) scales its activations per run, padding included, so in a
    shared run a text's embedding would depend on the texts beside it. A search's queries are
    short: one run per text cost no more CPU here than padded batches (7 ms each for the fp32
    MiniLM, 2.8 in int8)."""
    if not texts:
        raise ValueError("no texts to encode")
    runs = []
    for text in texts:
        e = tokenizer.encode(text)  # one text: padded to its own length, i.e. not at all
        runs.append(encoder.run(None, {"input_ids": np.array([e.ids], dtype=np.int64),
                                       "attention_mask": np.array([e.attention_mask], dtype=np.int64)})[0])
    return np.concatenate(runs)


@dataclass(frozen=True)
class QueryTable:
    """A version's embeddings of its most frequent training queries (``layout.QUERY_EMB`` and
    ``layout.QUERY_TEXTS``), computed by its own query encoder when the version was written.

    Search traffic repeats its head queries, and the encoder is most of a query's CPU on a CPU
    host. The LRU alone starts empty at each scorer start and each swap to a new query side, and
    misses each query the first time it is seen; the table answers the head from the first query
    on. Read-only once loaded: scoring threads share it without a lock."""

    rows: dict[str, int]  # encoder key -> row of emb
    emb: np.ndarray  # float32 [len(rows), D]

    @classmethod
    def load(cls, folder: Path, dim: int) -> QueryTable:
        """The table a version folder ships; an empty one for a version that ships none."""
        emb_path = folder / layout.QUERY_EMB
        texts = cls.texts(folder)
        if not texts or not emb_path.is_file():
            return cls({}, np.zeros((0, dim), np.float32))
        emb = np.load(emb_path).astype(np.float32, copy=False).reshape(len(texts), dim)
        return cls({t: i for i, t in enumerate(texts)}, emb)

    @staticmethod
    def texts(folder: Path) -> list[str]:
        """The encoder keys a version folder ships embedded, most frequent first ([] for none)."""
        path = folder / layout.QUERY_TEXTS
        return json.loads(path.read_text()) if path.is_file() else []


def head_queries(tokenizer: Tokenizer, texts: Iterable[str], limit: int) -> list[str]:
    """The encoder keys of the ``limit`` most frequent of ``texts`` (repeats count; ties keep
    first-seen order): what a version's :class:`QueryTable` holds."""
    counts = Counter(encoder_key(tokenizer, t) for t in texts)
    counts.pop("", None)
    return [k for k, _ in counts.most_common(limit)]


def write_query_table(folder: Path, keys: list[str], max_len: int) -> None:
    """Write a version's :class:`QueryTable` of ``keys`` (:func:`head_queries`, at least one)
    into ``folder``, which already holds its query encoder and tokenizer: each embedded by that
    encoder, as a scorer would."""
    tokenizer = query_tokenizer(folder / layout.TOKENIZER, None, max_len)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    encoder = ort.InferenceSession(str(folder / layout.QUERY_ENCODER), opts,
                                   providers=["CPUExecutionProvider"])
    np.save(folder / layout.QUERY_EMB, encode_texts(encoder, tokenizer, keys))
    (folder / layout.QUERY_TEXTS).write_text(json.dumps(keys))


def query_tokenizer(path: Path, sha256: str | None, max_len: int) -> Tokenizer:
    """The query tokenizer at ``path`` (truncating at ``max_len``, padding), one per file content
    (``sha256``, from the manifest the registry verified) and length: every version fine-tuned
    from one pretrained encoder ships the same file. Building one from its JSON holds the GIL for
    25-35 ms, a stall of the scoring thread on every swap (``make bench-swap``); dropping one, 4 ms
    more. Configured before it is shared, never after: concurrent ``encode_batch`` calls only read."""
    key = (sha256, max_len) if sha256 else None
    if key is not None:
        with _tokenizers_lock:
            if key in _tokenizers:
                _tokenizers.move_to_end(key)
                return _tokenizers[key]
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    if key is not None:
        with _tokenizers_lock:
            tokenizer = _tokenizers.setdefault(key, tokenizer)
            while len(_tokenizers) > TOKENIZERS_KEPT:
                _tokenizers.popitem(last=False)
    return tokenizer


def _malloc_trim():  # type: ignore[no-untyped-def]
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; ctypes releases the GIL while it runs
    except (OSError, AttributeError):  # another libc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory(retired: weakref.ref[ServedModel] | None = None, wait_s: float = 2.0) -> None:
    """Give the memory of a dropped version back to the OS (glibc's ``malloc_trim``).

    glibc keeps what a freed onnxruntime session held in its heaps: without this, a scorer's RSS
    rose by ~140 MB over its first swaps (two versions side by side, then the old one freed into
    the heaps) and stayed there. ``retired``: the version swapped out, which the batch in
    progress may hold a few ms more; trimmed once it is freed (or after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while retired is not None and retired() is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    if _MALLOC_TRIM is None:
        return
    started = time.perf_counter()
    _MALLOC_TRIM(0)
    log.info("memory_released", ms=round((time.perf_counter() - started) * 1000, 2),
             retired_alive=retired is not None and retired() is not None)


def _start_refresher(model: ServedModel, every_s: float) -> None:
    """A daemon thread that refreshes ``model`` until it is closed or garbage: it holds the model
    only weakly, so a swapped-out version is freed (and its thread ends) like any other."""
    ref = weakref.ref(model)
    stop = model._stop
    weakref.finalize(model, stop.set)
    version = model.version

    def run() -> None:
        while not stop.wait(every_s):
            current = ref()
            if current is None:
                return
            try:
                current.refresh()
            except Exception as exc:  # Redis away: keep serving the table we have, retry later
                log.warning("product_embeddings_refresh_failed", model_version=version, reason=str(exc))
            del current

    threading.Thread(target=run, name=f"embeddings-{version}", daemon=True).start()


def load_served_model(registry: Path, version: str, device: str = "auto", threads: int = 0,
                      embeddings: EmbeddingSource | None = None) -> ServedModel:
    """Verify, load and warm a version; raises when any of that fails."""
    model = ServedModel(load_version(registry, version, files=SERVED_FILES, optional=SERVED_OPTIONAL),
                        device=device, threads=threads, embeddings=embeddings)
    if model.feature_names != FEATURE_NAMES:
        model.close()
        # Its input layout differs from what features.read builds: every query would fail.
        differ = sorted(set(FEATURE_NAMES) ^ set(model.feature_names)) or ["their order"]
        raise RuntimeError(f"model {version} reads {len(model.feature_names)} features, this code serves "
                           f"{len(FEATURE_NAMES)} (differing: {', '.join(differ)}): retrain it")
    warm = Batch(query_emb=model.encode(["warm up"]), cand_idx=np.full((1, 2), UNKNOWN_ROW, np.int64),
                 hist_idx=np.full((1, 1), UNKNOWN_ROW, np.int64), hist_w=np.zeros((1, 1), np.float32),
                 dense=np.zeros((1, 2, len(model.feature_names)), np.float32), n_candidates=[2])
    if model.table.n:
        warm.cand_idx[0, 0] = 0
    scores = model.score(warm)[0]
    if not np.all(np.isfinite(scores)):
        model.close()
        raise RuntimeError(f"model {version} produced non-finite scores on warm-up")
    log.info("model_loaded", model_version=version, device=model.device, providers=model.providers,
             products=model.table.live, tower=model.tower.id if model.tower else None)
    return model
