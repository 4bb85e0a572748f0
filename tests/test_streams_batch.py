"""The batch engine's applier queue: how decoded batches are merged when the applier falls behind.

The worker is built against the real broker and Redis (it connects when constructed); the queue
logic is exercised directly, without consuming. And what the processor does with a result that
showed a product the catalog does not know: counts it, keeps the result.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis
from prometheus_client import REGISTRY

from core.events import CatalogProduct, RankedProduct, RankedResult, encode
from core.settings import Settings
from features import item, keys
from features.redis_store import RedisStore, connect
from streams.batch import BatchWorker
from streams.processor import Decoded, Processor, RawRecord
from streams.synthetic import Shape, catalog


def decoded(n: int, start: int = 0) -> Decoded:
    origins = [RawRecord("t", 0, start + i, None, b"{}") for i in range(n)]
    return Decoded([], origins, [])


def test_queued_batches_merge_up_to_the_batch_size(settings: Settings) -> None:
    worker = BatchWorker(settings.model_copy(update={
        "streams": settings.streams.model_copy(update={"batch_size": 10})}))
    try:
        a, b, c = decoded(4), decoded(5, 4), decoded(3, 9)
        worker._queue.put(a)
        worker._queue.put(b)
        batch, taken, last = worker._take()
        assert batch is not None and len(batch.origins) == 9 and (taken, last) == (2, False)
        assert [r.offset for r in batch.origins] == list(range(9))  # partition order kept

        worker._queue.put(c)
        worker._queue.put(decoded(2, 12))
        batch, taken, last = worker._take()
        assert batch is not None and len(batch.origins) == 5 and taken == 2

        worker._queue.put(decoded(8, 14))
        worker._queue.put(decoded(4, 22))
        batch, taken, _ = worker._take()  # 8 + 4 > 10: the second waits for the next call
        assert len(batch.origins) == 8 and taken == 1  # type: ignore[union-attr]
        worker._queue.put(None)
        batch, taken, last = worker._take()  # the held batch, then the stop sentinel
        assert len(batch.origins) == 4 and (taken, last) == (2, True)  # type: ignore[union-attr]
    finally:
        worker.consumer.close()


def test_a_result_showing_an_unknown_product_is_kept_counted_and_not_dead_lettered(
    settings: Settings, redis_client: redis.Redis
) -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    store = RedisStore(redis_client, settings.features)
    store.apply(CatalogProduct(product_id="p1", title="a tv", updated_at=t0))
    letters: list = []
    processor = Processor(settings, store, letters.extend)
    result = RankedResult(query_id="q1", user_id="u1", session_id="s", model_version="v", timestamp=t0,
                          products=[RankedProduct(product_id=p, score=1.0, position=i)
                                    for i, p in enumerate(["ghost", "p1"], 1)])
    before = REGISTRY.get_sample_value("shoprank_unknown_impressions_total") or 0.0
    dead = processor.apply([RawRecord(settings.topics.results, 0, 0, b"u1", encode(result))])
    assert dead == 0 and letters == []
    assert REGISTRY.get_sample_value("shoprank_unknown_impressions_total") == before + 1
    assert store.snapshot([], ["p1"], []).items["p1"][item.N_IMPRESSIONS] == 1.0


class Outage:
    """A TCP proxy in front of the real Redis that can be cut (open connections dropped, new ones
    closed at once) and restored: an outage as a client sees one, the server left alone."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = parts._replace(netloc=f"127.0.0.1:{self._server.getsockname()[1]}").geturl()
        self._up = threading.Event()
        self._up.set()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._up.clear()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self._server.close()


def test_a_batch_waits_out_an_outage_longer_than_the_clients_retries(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # The client gives up on a command within ~0.1 s; the outage lasts 1.5 s: the processor
    # retries the batch until Redis is back, and commits it once.
    outage = Outage(settings.redis.url)
    fast = settings.redis.model_copy(update={"url": outage.url, "retries": 2, "retry_cap_s": 0.05})
    store = RedisStore(connect(fast), settings.features, settings.streams)
    processor = Processor(settings, store, lambda letters: None)
    products = catalog(Shape(users=5, products=20))
    raws = [RawRecord(settings.topics.catalog, 0, i, None, encode(p)) for i, p in enumerate(products)]
    processor.apply(raws[:1])  # connected once: the outage cuts a live connection
    before = REGISTRY.get_sample_value("shoprank_stream_redis_unavailable_total") or 0.0
    outage.cut()
    restore = threading.Timer(1.5, outage.restore)
    restore.start()
    try:
        assert processor.apply(raws[1:]) == 0
    finally:
        restore.cancel()
        outage.close()
    assert (REGISTRY.get_sample_value("shoprank_stream_redis_unavailable_total") or 0.0) > before
    assert all(redis_client.exists(keys.product(p.product_id)) for p in products)
