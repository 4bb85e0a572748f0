"""The event contract: every kind round-trips through the real broker; invalid payloads are rejected
with a reason that names the field."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from core import events as ev
from core import kafka
from core.settings import Settings
from core.topics import route

T0 = datetime(2011, 8, 11, 3, 59, 4, 270000, tzinfo=UTC)

# Two products' served features in list order (three columns here; the scorer's schema names 28).
SERVED = ev.ServedFeatures.pack("f3-test", np.array([[1.0, 0.5, -2.0], [0.0, 0.25, 3.5]]),
                                history=["1004622"], history_weights=[0.75])

SAMPLES: dict[str, tuple[ev.Codec, ev.Event]] = {
    "query": (
        ev.QUERIES,
        ev.Query(
            query_id="q1",
            user_id="u1",
            session_id="s1",
            text="halo 3",
            candidates=["1004622", "9713872"],
            context=ev.QueryContext(location="US-CA", device="mobile"),
            timestamp=T0,
        ),
    ),
    "ranked_result": (
        ev.RESULTS,
        ev.RankedResult(
            query_id="q1",
            user_id="u1",
            session_id="s1",
            model_version="v1",
            products=[
                ev.RankedProduct(product_id="9713872", score=2.5, position=1),
                ev.RankedProduct(product_id="1004622", score=0.5, position=2),
            ],
            text="halo 3",
            features=SERVED,
            latency_ms=3.2,
            timestamp=T0,
        ),
    ),
    "labeled_list": (
        ev.LABELED,
        ev.LabeledList(
            list_id="q1", query_id="q1", user_id="u1", session_id="s1", text="halo 3", model_version="v1",
            products=[ev.LabeledProduct(product_id="9713872", position=1, score=2.5, grade=3),
                      ev.LabeledProduct(product_id="1004622", position=2, score=0.5)],
            features=SERVED, served_at=T0, timestamp=T0,
        ),
    ),
    "click": (
        ev.INTERACTIONS,
        ev.Click(event_id="e1", user_id="u1", session_id="s1", product_id="9713872", query_id="q1",
                 position=1, price=19.99, timestamp=T0),
    ),
    "add_to_cart": (
        ev.INTERACTIONS,
        ev.AddToCart(event_id="e2", user_id="u1", session_id="s1", product_id="9713872", price=19.99,
                     quantity=2, timestamp=T0),
    ),
    "purchase": (
        ev.INTERACTIONS,
        ev.Purchase(event_id="e3", user_id="u1", session_id="s1", product_id="9713872", order_id="o1",
                    price=19.99, timestamp=T0),
    ),
    "product": (
        ev.CATALOG,
        ev.CatalogProduct(product_id="9713872", title="Halo 3 - Xbox 360", description="Finish the fight.",
                          brand="Microsoft", category_path=["Video Games", "Xbox 360", "Games"],
                          price=19.99, attributes={"release_date": "2007-09-25"}, updated_at=T0),
    ),
    "model_update": (
        ev.MODEL_UPDATES,
        ev.ModelUpdate(model_version="v2", parent_version="v1", uri="models/v2", manifest_sha256="a" * 64,
                       metrics={"map@5": 0.8}, created_at=T0),
    ),
}


def topic_for(settings: Settings, kind: str) -> str:
    return route(settings, SAMPLES[kind][1])[0]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_event_is_routed_to_the_topic_of_its_codec_under_the_contracts_key(kind: str) -> None:
    t = Settings().topics
    codec, event = SAMPLES[kind]
    topic_of = {ev.QUERIES: t.queries, ev.RESULTS: t.results, ev.INTERACTIONS: t.interactions,
                ev.CATALOG: t.catalog, ev.MODEL_UPDATES: t.model_updates, ev.LABELED: t.labeled}
    key = {"product": getattr(event, "product_id", None), "model_update": "model"}.get(
        kind, getattr(event, "user_id", None))
    assert route(Settings(), event) == (topic_of[codec], key)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_event_round_trips_in_memory(kind: str) -> None:
    codec, event = SAMPLES[kind]
    assert codec.decode(ev.encode(event)) == event
    assert ev.ANY.decode(ev.encode(event)) == event


def test_every_kind_round_trips_through_the_broker(settings: Settings) -> None:
    producer = kafka.producer(settings)
    for kind, (_, event) in SAMPLES.items():
        producer.produce(topic_for(settings, kind), key=kind.encode(), value=ev.encode(event))
    assert producer.flush(30) == 0

    topics = sorted({topic_for(settings, k) for k in SAMPLES})
    consumer = kafka.consumer(settings, group_id=f"roundtrip-{settings.topics.queries}")
    consumer.subscribe(topics)
    received: dict[str, ev.Event] = {}
    deadline = time.monotonic() + 60
    try:
        while len(received) < len(SAMPLES) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                kind = msg.key().decode()
                received[kind] = SAMPLES[kind][0].decode(msg.value())
    finally:
        consumer.close()
    assert received == {kind: event for kind, (_, event) in SAMPLES.items()}


def _payload(kind: str, **changes: object) -> bytes:
    body = json.loads(ev.encode(SAMPLES[kind][1]))
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body).encode()


_DROP = object()

INVALID = [
    ("query", {"text": "   "}, "$.text"),
    ("query", {"text": ""}, "$.text"),
    ("query", {"text": "x" * 513}, "$.text"),
    ("query", {"user_id": _DROP}, "user_id"),
    ("query", {"candidates": ["ok", ""]}, "$.candidates[1]"),
    ("query", {"timestamp": "2011-08-11T03:59:04"}, "$.timestamp"),
    (
        "ranked_result",
        {"products": [{"product_id": "p", "score": 1.0, "position": 0}]},
        "$.products[0].position",
    ),
    ("ranked_result", {"model_version": _DROP}, "model_version"),
    ("ranked_result", {"features": {"schema": "f3-test"}}, "$.features"),
    ("labeled_list", {"products": [{"product_id": "p", "position": 1, "score": 1.0, "grade": 4}]},
     "$.products[0].grade"),
    ("click", {"price": -1}, "$.price"),
    ("click", {"position": "first"}, "$.position"),
    ("click", {"event_id": "has space"}, "$.event_id"),
    ("add_to_cart", {"quantity": 0}, "$.quantity"),
    ("purchase", {"order_id": _DROP}, "order_id"),
    ("purchase", {"currency": "dollars"}, "$.currency"),
    ("product", {"title": ""}, "$.title"),
    ("product", {"category_path": "Games"}, "$.category_path"),
    ("model_update", {"manifest_sha256": "not-a-hash"}, "$.manifest_sha256"),
    ("click", {"schema_version": 99}, "$.schema_version"),
    ("click", {"type": "hover"}, "$.type"),
]


@pytest.mark.parametrize(("kind", "changes", "field"), INVALID)
def test_invalid_payload_is_rejected_naming_the_field(kind: str, changes: dict, field: str) -> None:
    codec = SAMPLES[kind][0]
    payload = _payload(kind, **changes)
    with pytest.raises(ev.InvalidEvent) as info:
        codec.decode(payload)
    assert field in info.value.reason
    assert info.value.payload == payload


def test_malformed_json_is_rejected() -> None:
    with pytest.raises(ev.InvalidEvent, match="malformed JSON"):
        ev.INTERACTIONS.decode(b'{"type": "click", ')


def test_a_click_is_not_accepted_where_a_query_is_expected() -> None:
    with pytest.raises(ev.InvalidEvent, match=r"\$\.type"):
        ev.QUERIES.decode(ev.encode(SAMPLES["click"][1]))


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    event = ev.INTERACTIONS.decode(_payload("click", affiliation="Google Store", coupon="SUMMER"))
    assert event == SAMPLES["click"][1]


def test_served_features_pack_a_float32_matrix_and_refuse_a_wrong_row_count() -> None:
    matrix = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    served = ev.ServedFeatures.pack("f3-test", matrix, ["p1"], [0.5])
    back = ev.RESULTS.decode(ev.encode(ev.RankedResult(
        query_id="q", user_id="u", session_id="s", model_version="v", products=[], features=served,
        timestamp=T0))).features
    assert back is not None and back.history == ["p1"] and back.history_weights == [0.5]
    np.testing.assert_array_equal(back.matrix(4), matrix.astype(np.float32))
    with pytest.raises(ValueError, match="not a multiple of 5 rows"):
        back.matrix(5)
