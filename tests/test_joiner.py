"""The joiner: pure join rules, then the real process against the real broker and Redis."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from confluent_kafka import TopicPartition

from core import kafka
from core.events import (
    LABELED,
    AddToCart,
    Click,
    LabeledList,
    Purchase,
    RankedProduct,
    RankedResult,
    ServedFeatures,
    encode,
)
from core.settings import JoinerSettings, Settings
from features import keys
from features.read import FEATURE_NAMES, FEATURE_SCHEMA
from streams.join import JoinTask, coverage
from streams.joiner import stored_totals
from streams.testing import Worker, dump_db, environment, restore_db, wait_until
from tests.conftest import RedisAt

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CFG = JoinerSettings(click_window_s=1800, purchase_window_s=86400)


def result(qid: str, user: str, products: list[str], at: datetime, text: str = "red shoes") -> RankedResult:
    matrix = np.arange(len(products) * len(FEATURE_NAMES), dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
    return RankedResult(
        query_id=qid, user_id=user, session_id=f"s-{user}", model_version="v1", text=text,
        products=[RankedProduct(product_id=p, score=float(-i), position=i + 1)
                  for i, p in enumerate(products)],
        features=ServedFeatures.pack(FEATURE_SCHEMA, matrix, ["p9"], [1.0]) if products else None,
        timestamp=at)


def click(user: str, product: str, at: datetime, qid: str | None = None, kind: type = Click,
          eid: str | None = None) -> Click:
    extra = {"order_id": "o1", "price": 1.0} if kind is Purchase else {}
    return kind(event_id=eid or f"e-{user}-{product}-{at.timestamp()}-{kind.__name__}", user_id=user,
                session_id=f"s-{user}", product_id=product, query_id=qid, timestamp=at, **extra)


def run(events: list, watermark: datetime, task: JoinTask | None = None) -> JoinTask:
    task = task or JoinTask(CFG, {}, {})
    for ev in events:
        if isinstance(ev, RankedResult):
            task.result(ev, encode(ev))
        else:
            task.interaction(ev)
    # What the joiner's due index holds: every list whose deadline the watermark has passed.
    due = [q for q, lst in task.lists.items() if lst.deadline(CFG) <= watermark.timestamp()]
    task.advance(watermark.timestamp(), due)
    return task


# --- the rules ----------------------------------------------------------------------------------


def test_a_list_is_emitted_when_its_click_window_closes_graded_purchase_over_cart_over_click() -> None:
    r = result("q1", "u1", ["a", "b", "c", "d"], T0)
    events = [r, click("u1", "a", T0 + timedelta(minutes=1), "q1"),
              click("u1", "b", T0 + timedelta(minutes=2), "q1"),
              click("u1", "b", T0 + timedelta(minutes=3), "q1", AddToCart),
              click("u1", "c", T0 + timedelta(minutes=4), "q1", Purchase)]
    open_task = run(events, T0 + timedelta(minutes=29))
    assert open_task.emitted == []  # the window is still open
    task = run([], T0 + timedelta(minutes=30), open_task)
    [lst] = task.emitted
    assert (lst.list_id, lst.revision, lst.text, lst.model_version) == ("q1", 1, "red shoes", "v1")
    assert [(p.product_id, p.position, p.grade) for p in lst.products] == [
        ("a", 1, 1), ("b", 2, 2), ("c", 3, 3), ("d", 4, 0)]
    assert lst.features is not None and lst.features.schema == FEATURE_SCHEMA
    np.testing.assert_array_equal(lst.features.matrix(4), r.features.matrix(4))  # type: ignore[union-attr]
    assert lst.served_at == T0
    assert task.counts.clicks == 2 and task.counts.matched == 2 and coverage(task.counts.as_dict()) == 1.0


def test_a_labeled_list_keeps_the_first_positions_and_every_product_acted_on_below_them() -> None:
    cfg = JoinerSettings(click_window_s=1800, purchase_window_s=86400, max_list_len=2)
    products = ["a", "b", "c", "d", "e"]
    r = result("q1", "u1", products, T0)
    task = JoinTask(cfg, {}, {})
    task.result(r, encode(r))
    task.interaction(click("u1", "d", T0 + timedelta(minutes=1), "q1"))
    task.advance((T0 + timedelta(hours=1)).timestamp(), [])
    [lst] = task.emitted
    kept = [(p.product_id, p.position, p.grade) for p in lst.products]
    assert kept == [("a", 1, 0), ("b", 2, 0), ("d", 4, 1)]
    assert lst.features is not None
    np.testing.assert_array_equal(lst.features.matrix(3), r.features.matrix(5)[[0, 1, 3]])  # type: ignore[union-attr]


def test_a_late_purchase_emits_a_correction_and_a_late_click_counts_nothing() -> None:
    task = run([result("q1", "u1", ["a", "b"], T0), click("u1", "a", T0 + timedelta(minutes=5), "q1")],
               T0 + timedelta(hours=1))
    assert [lst.revision for lst in task.emitted] == [1]
    later = JoinTask(CFG, task.lists, task.user_lists)
    run([click("u1", "b", T0 + timedelta(hours=2), "q1"),  # a click after the window: late
         click("u1", "b", T0 + timedelta(hours=3), "q1", Purchase)], T0 + timedelta(hours=3), later)
    [correction] = later.emitted
    assert correction.revision == 2 and correction.timestamp == T0 + timedelta(hours=3)
    assert [(p.product_id, p.grade) for p in correction.products] == [("a", 1), ("b", 3)]
    assert later.counts.late == 1 and later.counts.corrections == 1
    # Past the purchase window the list is forgotten.
    gone = JoinTask(CFG, later.lists, later.user_lists)
    gone.advance((T0 + timedelta(days=1, seconds=1)).timestamp(), ["q1"])
    assert gone.deleted == {"q1"} and gone.unindexed == {"u1": {"q1"}}


def test_without_a_query_id_the_shoppers_latest_list_showing_the_product_gets_the_click() -> None:
    events = [result("q1", "u1", ["a", "b"], T0), result("q2", "u1", ["b", "c"], T0 + timedelta(minutes=5)),
              result("q3", "u2", ["a"], T0 + timedelta(minutes=6)),
              click("u1", "b", T0 + timedelta(minutes=7)),  # q2: the latest list showing b
              click("u1", "a", T0 + timedelta(minutes=8)),  # q1: the only one of u1's showing a
              click("u1", "z", T0 + timedelta(minutes=9))]  # in no list of u1's
    task = run(events, T0 + timedelta(hours=1))
    grades = {lst.list_id: {p.product_id: p.grade for p in lst.products} for lst in task.emitted}
    assert grades == {"q1": {"a": 1, "b": 0}, "q2": {"b": 1, "c": 0}, "q3": {"a": 0}}
    assert (task.counts.clicks, task.counts.matched, task.counts.unmatched) == (3, 2, 1)


def test_clicks_read_before_their_result_wait_for_it_and_expire_unmatched_without_it() -> None:
    task = run([click("u1", "a", T0 + timedelta(minutes=1), "q1"),
                click("u2", "x", T0 + timedelta(minutes=1), "q-never-served")], T0 + timedelta(minutes=10))
    assert task.emitted == [] and task.lists["q1"].result is None
    later = JoinTask(CFG, task.lists, task.user_lists)
    run([result("q1", "u1", ["a", "b"], T0)], T0 + timedelta(minutes=40), later)
    [lst] = later.emitted
    assert [(p.product_id, p.grade) for p in lst.products] == [("a", 1), ("b", 0)]
    assert "q-never-served" in later.deleted
    clicks = task.counts.clicks + later.counts.clicks
    assert (clicks, later.counts.matched, later.counts.unmatched) == (2, 1, 1)


def test_a_click_waits_for_a_result_still_unread_whatever_the_event_time_says() -> None:
    # A search answered with a future time was read first (a replay's warm-up, a skewed clock):
    # the watermark is far ahead, but the click's own result is not read yet on the broker.
    task = JoinTask(CFG, {}, {})
    task.interaction(click("u1", "a", T0 + timedelta(minutes=1), "q1"), record_ms=50_000)
    task.advance((T0 + timedelta(days=1)).timestamp(), [], results_read_ms=40_000)
    assert "q1" not in task.deleted and task.counts.unmatched == 0
    later = JoinTask(CFG, task.lists, task.user_lists)
    later.result(result("q1", "u1", ["a", "b"], T0), encode(result("q1", "u1", ["a", "b"], T0)))
    later.advance((T0 + timedelta(days=1)).timestamp(), ["q1"], results_read_ms=60_000)
    assert [(p.product_id, p.grade) for p in later.emitted[0].products] == [("a", 1), ("b", 0)]
    # Once results newer on the broker than the click (by the grace) were read, it gives up.
    orphan = JoinTask(CFG, {}, {})
    orphan.interaction(click("u2", "x", T0, "q-lost"), record_ms=50_000)
    orphan.advance((T0 + timedelta(days=1)).timestamp(), [], results_read_ms=50_000 + 60_000)
    assert orphan.deleted == {"q-lost"} and orphan.counts.unmatched == 1


def test_the_first_result_of_a_query_wins_and_error_results_are_not_lists() -> None:
    first = result("q1", "u1", ["a", "b"], T0)
    again = result("q1", "u1", ["b", "a"], T0 + timedelta(seconds=1))  # a redelivered query re-ranked
    failed = RankedResult(query_id="q2", user_id="u1", session_id="s", model_version="v1", products=[],
                          error="invalid query", timestamp=T0)
    task = run([first, again, failed], T0 + timedelta(hours=1))
    assert [[p.product_id for p in lst.products] for lst in task.emitted] == [["a", "b"]]


# --- the process, against the real broker and Redis ------------------------------------------------


def _workload(n: int, seed: int = 7) -> tuple[list, dict[str, dict[str, int]]]:
    """n searches over 40 shoppers, each served 8 products, with clicks, carts and purchases; the
    grades each list must end with."""
    rng = random.Random(seed)
    events: list = []
    expected: dict[str, dict[str, int]] = {}
    for i in range(n):
        user, qid, at = f"u{i % 40}", f"q{i:04d}", T0 + timedelta(seconds=30 * i)
        products = [f"p{rng.randrange(60)}-{j}" for j in range(8)]
        events.append(result(qid, user, products, at, text=f"query {i % 17}"))
        grades = dict.fromkeys(products, 0)
        for product, grade, kind in ((products[rng.randrange(8)], 1, Click), (products[0], 2, AddToCart)):
            if rng.random() < 0.6:
                events.append(click(user, product, at + timedelta(seconds=5 + grade), qid, kind))
                grades[product] = max(grades[product], grade)
        expected[qid] = grades
    return events, expected


def _publish_partitioned(settings: Settings, events: list, close: bool = True) -> None:
    """Publish keyed by user id, as the contract says, then (``close``) one late empty result per
    partition: it moves each partition's event time past every window."""
    producer = kafka.producer(settings)
    t = settings.topics
    for ev in events:
        topic = t.results if isinstance(ev, RankedResult) else t.interactions
        producer.produce(topic, encode(ev), key=ev.user_id.encode())
    if not close:
        assert producer.flush(30) == 0
        return
    end = T0 + timedelta(days=2)
    for p in range(t.partitions):
        producer.produce(t.results, encode(result(f"tick-{p}", f"tick-{p}", [], end)), partition=p)
    assert producer.flush(30) == 0


def _labeled(settings: Settings) -> list[LabeledList]:
    consumer = kafka.consumer(settings, group_id="test-reader")
    t = settings.topics.labeled
    out = []
    for p in range(settings.topics.partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
        if high <= low:
            continue
        consumer.assign([TopicPartition(t, p, low)])
        while True:
            msg = consumer.poll(5)
            assert msg is not None, "the labeled topic did not deliver what its watermark says it has"
            if msg.error() is None:
                out.append(LABELED.decode(msg.value()))
            if msg.offset() >= high - 1:
                break
    consumer.close()
    return out


def _count_labeled(settings: Settings) -> int:
    consumer = kafka.consumer(settings, group_id="test-counter")
    marks = kafka.watermarks(consumer, [settings.topics.labeled])
    consumer.close()
    return sum(high - low for low, high in marks.values())


def _joiner(settings: Settings, tmp_path: Path, name: str) -> Worker:
    env = environment(settings) | {"SHOPRANK_JOINER_GROUP_ID": f"joiner-{settings.topics.labeled}",
                                   "SHOPRANK_JOINER_BATCH_SIZE": "25", "SHOPRANK_LOG_LEVEL": "INFO"}
    return Worker(env, tmp_path / f"{name}.log", command="joiner")


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_a_sigkilled_joiner_loses_and_duplicates_no_list(settings: Settings, redis_at: RedisAt, topology: str,
                                                          tmp_path: Path) -> None:
    joiner_settings, redis_client = redis_at(topology, settings)  # two partitions
    events, expected = _workload(400)
    _publish_partitioned(joiner_settings, events)
    first = _joiner(joiner_settings, tmp_path, "first")
    try:
        wait_until(lambda: _count_labeled(joiner_settings) > 0 or not first.alive(), 120, 0.01,
                   "the first labeled lists")
        assert first.alive(), first.log_tail()
    finally:
        first.kill()  # SIGKILL: no shutdown, no final commit
    published_before = _count_labeled(joiner_settings)
    second = _joiner(joiner_settings, tmp_path, "second")
    try:
        wait_until(lambda: _count_labeled(joiner_settings) >= len(expected) or not second.alive(), 120,
                   what="every list labeled")
        assert second.alive(), second.log_tail()
    finally:
        assert second.stop() == 0, second.log_tail()
    lists = _labeled(joiner_settings)
    ids = [lst.list_id for lst in lists]
    assert len(ids) == len(set(ids)), "a list was published twice"
    assert set(ids) == set(expected), f"missing: {sorted(set(expected) - set(ids))[:5]}"
    assert published_before < len(expected), "the kill came after the work was done: not a crash test"
    for lst in lists:
        assert {p.product_id: p.grade for p in lst.products} == expected[lst.list_id], lst.list_id
        assert lst.revision == 1 and lst.features is not None
    totals = stored_totals(redis_client, joiner_settings.topics.partitions)
    clicks = sum(1 for ev in events if isinstance(ev, Click))
    assert totals["clicks"] == clicks and totals["lists"] == len(expected)  # nothing counted twice
    assert coverage(totals) == 1.0


def _joined_to_the_end(settings: Settings, client: redis.Redis) -> bool:
    """Whether the joiner's offsets in Redis reached the last record of both inputs everywhere."""
    consumer = kafka.consumer(settings, group_id="test-ends")
    marks = kafka.watermarks(consumer, [settings.topics.results, settings.topics.interactions])
    consumer.close()
    for (topic, p), (low, high) in marks.items():
        stored = client.hget(keys.join_offsets(p), topic)
        if high > low and (stored is None or int(stored) < high - 1):
            return False
    return True


def test_a_joiner_replays_what_redis_lost_of_its_acknowledged_writes(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A failover to a replica that lacked the joiner's last commits (restored from an earlier copy
    under the running joiner): it joins the lost records again. Every list ends labeled once in
    effect: lists published before the loss are published again with the same id and revision
    (readers keep one), and the stored counts equal one pass over the events."""
    events, expected = _workload(300)
    half = len(events) // 2
    joiner = _joiner(settings, tmp_path, "joiner")
    try:
        _publish_partitioned(settings, events[:half], close=False)
        wait_until(lambda: _joined_to_the_end(settings, redis_client), 120, what="the first half joined")
        earlier = dump_db(redis_client)
        _publish_partitioned(settings, events[half:], close=False)
        wait_until(lambda: _joined_to_the_end(settings, redis_client), 120, what="the second half joined")
        restore_db(redis_client, earlier)
        wait_until(lambda: "replaying_from_redis" in joiner.log_tail(400) or not joiner.alive(), 60,
                   what="the joiner to notice Redis is behind it")
        _publish_partitioned(settings, [])  # close every window
        wait_until(lambda: {lst.list_id for lst in _labeled(settings)} >= set(expected) or not joiner.alive(),
                   120, what="every list labeled")
        assert joiner.alive(), joiner.log_tail()
        wait_until(lambda: _joined_to_the_end(settings, redis_client), 60, what="everything joined")
    finally:
        assert joiner.stop() == 0, joiner.log_tail()
    copies: dict[str, list[LabeledList]] = {}
    for lst in _labeled(settings):
        copies.setdefault(lst.list_id, []).append(lst)
    assert set(copies) == set(expected)
    for qid, same in copies.items():
        assert all(c.revision == 1 for c in same), qid  # published again, never corrected
        for lst in same:
            assert {p.product_id: p.grade for p in lst.products} == expected[qid], qid
    totals = stored_totals(redis_client, settings.topics.partitions)
    clicks = sum(1 for ev in events if isinstance(ev, Click))
    assert totals["clicks"] == clicks and totals["lists"] == len(expected)  # counted once
