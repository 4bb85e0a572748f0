"""``shoprank embedder``: every catalog product embedded by the serving version's product tower,
as it arrives, into Redis where every scorer reads it (:mod:`features.embeddings`).

A consumer-group service beside the feature workers (several share the catalog's partitions).
It loads the product tower of the version in ``SERVING`` (``product_encoder.onnx``, onnxruntime,
no torch), reads the compacted catalog topic from the start, embeds each product's text
(:func:`core.text.product_text`) in batches and commits its offsets once Redis has the vectors.
Writes are idempotent: a product whose text is unchanged is not embedded again (its stored
vector stays as it is), an edit replaces the vector, an older version of a product never
replaces a newer one. When the serving version's tower changes, it first embeds the whole
catalog for the new tower (the topic from the start to where it stands: every product, whether
or not a feature worker has applied it yet), then goes on.

:func:`embed_catalog` embeds every product the feature workers have stored (``pd:`` documents)
for a version's tower: the trainer calls it before announcing a version, so the live catalog's
vectors exist before the version serves. Embedding the same products twice costs only the reads.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

import numpy as np
import onnxruntime as ort
import redis
import structlog
from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition
from tokenizers import Tokenizer

from core import kafka, layout
from core.events import CATALOG, CatalogProduct, InvalidEvent
from core.registry import ModelVersion, RegistryError, load_version, serving_version
from core.settings import Settings
from core.text import product_text
from features import keys
from features.embeddings import ProductEmbeddings, encode_value, text_digest
from features.redis_store import connect, mget_any
from scorer.runtime import choose_providers

log = structlog.get_logger(__name__)

CHUNK = 512  # products per Redis round trip (and per embedding call, split into batches)


class ProductTower:
    """A version's product tower in onnxruntime: product texts -> L2-normalized vectors."""

    def __init__(self, version: ModelVersion, device: str = "cpu", threads: int = 0) -> None:
        spec = layout.product_tower(version.manifest)
        if spec is None:
            raise RegistryError(f"version {version.version} ships no {layout.PRODUCT_ENCODER}")
        self.id = spec.id
        self.max_len = spec.max_len
        self.version = version.version
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(version.path / layout.PRODUCT_ENCODER), opts,
                                            providers=choose_providers(device))
        self.tokenizer = Tokenizer.from_file(str(version.path / layout.TOKENIZER))
        self.tokenizer.enable_truncation(self.max_len)
        self.tokenizer.no_padding()  # padded per batch below, to its longest text

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Vectors [len(texts), D]; texts of similar length share a batch, so little is padded."""
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = max(1, max(len(encoded[i]) for i in rows))
            ids = np.zeros((len(rows), length), np.int64)
            mask = np.zeros((len(rows), length), np.int64)
            for j, i in enumerate(rows):
                ids[j, : len(encoded[i])] = encoded[i]
                mask[j, : len(encoded[i])] = 1
            got = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            if out is None:
                out = np.zeros((len(texts), got.shape[1]), np.float32)
            out[rows] = got
        return out if out is not None else np.zeros((0, 0), np.float32)


@dataclass
class EmbedStats:
    """What a pass did: products read, embedded (the model ran), vectors changed in Redis."""

    seen: int = 0
    embedded: int = 0
    changed: int = 0
    invalid: int = 0
    seconds: float = 0.0

    def add(self, other: EmbedStats) -> None:
        self.seen += other.seen
        self.embedded += other.embedded
        self.changed += other.changed
        self.invalid += other.invalid
        self.seconds += other.seconds


def embed_products(tower: ProductTower, store: ProductEmbeddings, products: Sequence[CatalogProduct],
                   batch_size: int = 64) -> EmbedStats:
    """Embed what is new or edited among ``products`` and store it; skip what Redis has already.

    A product whose stored vector came from the same text keeps it (at most its header's time
    moves); one older than what is stored is ignored; the rest are embedded in one call.
    """
    started = time.perf_counter()
    latest: dict[str, CatalogProduct] = {}
    for p in products:  # the newest version of each product in the batch
        old = latest.get(p.product_id)
        if old is None or p.updated_at >= old.updated_at:
            latest[p.product_id] = p
    ids = list(latest)
    values: list[tuple[str, bytes]] = []
    todo: list[tuple[str, int, str, str]] = []
    for pid, stored in zip(ids, store.stored(ids), strict=True):
        product = latest[pid]
        text = product_text(product)
        at_ms = int(product.updated_at.timestamp() * 1000)
        digest = text_digest(text)
        if stored is not None:
            if at_ms < stored.updated_at_ms:
                continue  # a replay of an older version
            if stored.digest == digest:
                if at_ms > stored.updated_at_ms:  # same text, newer record: the same vector
                    values.append((pid, encode_value(at_ms, digest, stored.vector)))
                continue
        todo.append((pid, at_ms, digest, text))
    if todo:
        vectors = tower.embed([t for *_, t in todo], batch_size)
        values += [(pid, encode_value(at_ms, digest, vec))
                   for (pid, at_ms, digest, _), vec in zip(todo, vectors, strict=True)]
    changed = store.write(values)
    return EmbedStats(seen=len(products), embedded=len(todo), changed=changed,
                      seconds=time.perf_counter() - started)


def _chunks(items: Iterable[CatalogProduct], n: int = CHUNK) -> Iterator[list[CatalogProduct]]:
    chunk: list[CatalogProduct] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stored_products(client: redis.Redis, stats: EmbedStats | None = None) -> Iterator[CatalogProduct]:
    """Every product document the feature workers keep (``pd:``), as the catalog sent it."""
    names = client.scan_iter(match=keys.PRODUCT_DOC + "*", count=1000)
    batch: list[bytes] = []

    def decoded(raws: list[bytes | None]) -> Iterator[CatalogProduct]:
        for raw in raws:
            if not raw:
                continue
            try:
                yield CATALOG.decode(raw)
            except InvalidEvent as exc:
                if stats is not None:
                    stats.invalid += 1
                log.warning("product_doc_invalid", reason=exc.reason)

    for name in names:
        batch.append(name)
        if len(batch) >= CHUNK:
            yield from decoded(mget_any(client, batch))
            batch = []
    if batch:
        yield from decoded(mget_any(client, batch))


def embed_catalog(client: redis.Redis, version: ModelVersion | ProductTower, batch_size: int = 64,
                  device: str = "cpu", threads: int = 0) -> EmbedStats:
    """Embed every product of the live catalog (the ``pd:`` documents) for ``version``'s product
    tower; returns what it did. Call it before announcing a version with a new tower."""
    tower = version if isinstance(version, ProductTower) else ProductTower(version, device, threads)
    store = ProductEmbeddings(client, tower.id)
    stats = EmbedStats()
    for chunk in _chunks(stored_products(client, stats)):
        stats.add(embed_products(tower, store, chunk, batch_size))
    _log_pass("redis", tower, stats)
    return stats


def embed_live_catalog(settings: Settings, version: ModelVersion) -> EmbedStats | None:
    """Before ``version`` serves: embed the live catalog for its product tower (None when it ships
    none). Redis unreachable is logged, not raised: scorers then serve the shipped rows, and the
    embedder catches up when it takes the tower."""
    if layout.product_tower(version.manifest) is None:
        return None
    try:
        return embed_catalog(connect(settings.redis), version, settings.embedder.batch_size,
                             settings.scorer.device, settings.embedder.threads)
    except redis.RedisError as exc:
        log.error("catalog_not_embedded", model_version=version.version, reason=str(exc))
        return None


def _log_pass(source: str, tower: ProductTower, stats: EmbedStats) -> None:
    log.info("catalog_embedded", source=source, model_version=tower.version, tower=tower.id,
             products=stats.seen, embedded=stats.embedded, changed=stats.changed, invalid=stats.invalid,
             seconds=round(stats.seconds, 2))


def decode_products(msgs: Sequence[Message], stats: EmbedStats) -> list[CatalogProduct]:
    """The valid catalog records; the rest are the feature workers' to dead-letter (counted here)."""
    out = []
    for m in msgs:
        if m.error() is not None or m.value() is None:
            continue
        try:
            out.append(CATALOG.decode(m.value()))
        except InvalidEvent:
            stats.invalid += 1
    return out


def embed_topic(settings: Settings, client: redis.Redis, tower: ProductTower) -> EmbedStats:
    """Embed every product on the catalog topic, from its start to where it stands now, for
    ``tower`` (no consumer group: this reads, it commits nothing)."""
    consumer = kafka.consumer(settings, group_id=f"shoprank-embedder-scan-{uuid.uuid4().hex[:8]}")
    store = ProductEmbeddings(client, tower.id)
    stats = EmbedStats()
    try:
        marks = kafka.watermarks(consumer, [settings.topics.catalog])
        ends = {tp: high for tp, (_low, high) in marks.items()}
        if ends:
            consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        while ends:
            msgs = consumer.consume(num_messages=CHUNK, timeout=1.0)
            products = decode_products(msgs, stats)
            if products:
                stats.add(embed_products(tower, store, products, settings.embedder.batch_size))
            kafka.drop_reached(consumer, ends)
    finally:
        consumer.close()
    _log_pass("topic", tower, stats)
    return stats


class Embedder:
    """The service: follows the serving version's product tower and the catalog topic."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client if client is not None else connect(settings.redis)
        self.tower: ProductTower | None = None
        self.stats = EmbedStats()
        self._version: str | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("embedder_stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def follow_serving(self) -> bool:
        """Take the serving version's tower when it differs from ours, embedding the whole catalog
        for it first; True when the tower changed."""
        registry = self.settings.model.registry_dir
        version = serving_version(registry)
        if version is None or version == self._version:
            return False
        loaded = load_version(registry, version)
        self._version = version
        spec = layout.product_tower(loaded.manifest)
        if spec is None:
            log.warning("embedder_no_tower", model_version=version,
                        kept=self.tower.id if self.tower else None,
                        reason=f"the serving version ships no {layout.PRODUCT_ENCODER}")
            return False
        if self.tower is not None and spec.id == self.tower.id:
            return False
        e = self.settings.embedder
        tower = ProductTower(loaded, self.settings.scorer.device, e.threads)
        log.info("embedder_tower", model_version=version, tower=tower.id,
                 previous=self.tower.id if self.tower else None)
        self.stats.add(embed_topic(self.settings, self.client, tower))
        self.tower = tower
        return True

    def run(self, once: bool = False) -> EmbedStats:
        """Until stopped (``once``: take the serving tower, embed the catalog, return)."""
        s = self.settings
        next_check = 0.0
        consumer = None
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_check:
                    try:
                        self.follow_serving()
                    except Exception as exc:  # a broken version must not stop the embedding
                        log.error("embedder_tower_failed", reason=str(exc))
                    next_check = time.monotonic() + s.embedder.check_s
                if once:
                    break
                if self.tower is None:  # nothing serving yet: nothing to embed with
                    self._stopping.wait(min(s.embedder.check_s, 0.5))
                    continue
                if consumer is None:
                    consumer = kafka.consumer(s, group_id=s.embedder.group_id)
                    consumer.subscribe([s.topics.catalog])
                self._consume(consumer)
        finally:
            if consumer is not None:
                consumer.close()
        return self.stats

    def _consume(self, consumer) -> None:  # type: ignore[no-untyped-def]  # confluent Consumer
        assert self.tower is not None
        s = self.settings
        msgs = consumer.consume(num_messages=CHUNK, timeout=0.5)
        if not msgs:
            return
        stats = EmbedStats()
        products = decode_products(msgs, stats)
        if products:
            stats.add(embed_products(self.tower, ProductEmbeddings(self.client, self.tower.id), products,
                                     s.embedder.batch_size))
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                offsets[(m.topic(), m.partition())] = max(offsets.get((m.topic(), m.partition()), 0),
                                                          m.offset() + 1)
        if offsets:  # Redis has this batch's vectors: its records are done
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                            asynchronous=False)
        self.stats.add(stats)
        log.info("products_embedded", tower=self.tower.id, records=len(msgs), embedded=stats.embedded,
                 changed=stats.changed, invalid=stats.invalid, ms=round(stats.seconds * 1000, 1))


def run_embedder(settings: Settings, once: bool = False) -> int:
    embedder = Embedder(settings)
    embedder.install_signal_handlers()
    log.info("embedder_started", topic=settings.topics.catalog, group=settings.embedder.group_id,
             registry=str(settings.model.registry_dir))
    stats = embedder.run(once=once)
    if once and embedder.tower is None:
        log.error("embedder_no_serving_tower", registry=str(settings.model.registry_dir))
        return 1
    log.info("embedder_stopped", products=stats.seen, embedded=stats.embedded, changed=stats.changed)
    return 0
