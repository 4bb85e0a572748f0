"""The query evidence layout (features.keys: one ``qh:{q}`` hash per query text): what a commit
writes, how long it lives, and that both ways a scorer reads it give the same features."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from core.settings import FeatureSettings
from core.text import normalize_query, query_words
from features import keys, query_item, redis_store
from features.memory import MemoryStore
from features.plan import Record
from features.read import INDEX, Request, read_batch
from features.redis_store import RedisStore
from streams.synthetic import Shape, catalog, sessions

CFG = FeatureSettings()


def _loaded(client: redis.Redis) -> tuple[MemoryStore, RedisStore, list[Request], float]:
    shape = Shape(users=30, products=80)
    events = [*catalog(shape), *sessions(shape, 800)]
    memory, online = MemoryStore(CFG), RedisStore(client, CFG)
    for ev in events:
        memory.apply(ev)
    for i in range(0, len(events), 200):
        online.apply_batch([Record(ev) for ev in events[i : i + 200]])
    texts = ["tv case", "laptop phone", "case for a phone"]
    candidates = [f"p{p}" for p in range(80)]
    requests = [Request(f"u{u}", normalize_query(texts[u % 3]), candidates, words=query_words(texts[u % 3]))
                for u in range(30)]
    requests.append(Request("u1", normalize_query("tv"), candidates[:7], words=query_words("tv")))
    return memory, online, requests, events[-1].timestamp.timestamp() + 600


def test_a_query_evidence_is_one_hash_per_text_with_its_totals_and_one_expiry(
        redis_client: redis.Redis) -> None:
    memory, _, _, _ = _loaded(redis_client)
    assert not list(redis_client.scan_iter(match="qi:*")) and not list(redis_client.scan_iter(match="qc:*"))
    hashes = [k.decode() for k in redis_client.scan_iter(match=keys.QUERY_EVIDENCE + "*")]
    assert hashes, "the sessions' clicks after queries wrote evidence"
    for name in hashes:
        text = name[len(keys.QUERY_EVIDENCE):]
        fields = redis_client.hgetall(name)
        totals = memory._shards[0].query_totals[text]
        assert query_item.decode(fields.pop(keys.QUERY_TOTAL_FIELD.encode())) == totals
        assert {p.decode(): query_item.decode(v) for p, v in fields.items()} == {
            pid: st for (t, pid), st in memory._shards[0].query_items.items() if t == text}
        ttl_ms = redis_client.pttl(name)
        assert CFG.query_item_ttl_s * 1000 - 60_000 < ttl_ms <= CFG.query_item_ttl_s * 1000


def test_large_evidence_hashes_are_read_for_the_candidates_only_and_read_alike(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    memory, online, requests, now = _loaded(redis_client)
    whole = read_batch(online, requests, now)
    monkeypatch.setattr(redis_store, "WHOLE_HASH_MAX", 0)  # every hash read whole once is "large"
    read_batch(online, requests, now)
    assert online._large_hashes, "hashes larger than WHOLE_HASH_MAX are remembered"
    by_field = read_batch(online, requests, now)  # now HMGET of the candidates
    offline = read_batch(memory, requests, now)
    assert any(r.features[:, INDEX["query_item_clicks_log"]].any() for r in offline)
    for a, b, c in zip(whole, by_field, offline, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.features, c.features)
