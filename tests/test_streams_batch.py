"""The batch engine's applier queue: how decoded batches are merged when the applier falls behind.

The worker is built against the real broker and Redis (it connects when constructed); the queue
logic is exercised directly, without consuming. And what the processor does with a result that
showed a product the catalog does not know: counts it, keeps the result.
"""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from prometheus_client import REGISTRY

from core.events import CatalogProduct, RankedProduct, RankedResult, encode
from core.settings import Settings
from features import item
from features.redis_store import RedisStore
from streams.batch import BatchWorker
from streams.processor import Decoded, Processor, RawRecord


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
