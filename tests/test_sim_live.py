"""SIMULATION through a live engine of its own (sim.live): real Kafka, Redis, scorers, feature worker."""

from __future__ import annotations

import os
from pathlib import Path

from core.events import QueryContext
from core.settings import Settings
from features.read import INDEX, Request, read_batch
from features.redis_store import RedisStore, connect
from sim.live import LiveConfig, LiveSim, figures
from sim.world import SimParams, World
from tests.model_factory import split, tiny_version


def test_simulated_shoppers_through_the_engine(tmp_path: Path) -> None:
    db = int(os.environ.get("SHOPRANK_TEST_REDIS_DB", "3"))
    s = split()
    registry = tmp_path / "versions"
    tiny_version(registry, "sim-p")
    world = World(SimParams(shoppers=12, days=2, seed=3), s.catalog, s.train)
    searches = world.schedule(s.cutoff)[:24]
    from replay.to_events import bestbuy_replay

    catalog = bestbuy_replay(Settings().data_dir).catalog
    live = LiveSim(
        world,
        searches,
        LiveConfig(
            registry=registry,
            personal_version="sim-p",
            step_searches=4,
            port=8296,
            work=tmp_path / "work",
            redis_db=db,
        ),
    )
    live.run(history=[], catalog=catalog)
    ids = [x.query_id for x in searches]
    # Every search ranked by both arms over the whole catalog; the shoppers answered the personal one.
    for arm in ("personal", "nonpersonal"):
        assert set(live.served[arm]) == set(ids)
        assert all(sorted(live.served[arm][q]) == sorted(world.product_ids) for q in ids)
    assert set(live.versions.values()) == {"sim-p"}
    acts = {q: a for q, a in live.actions.items() if any(x.kind == "click" for x in a)}
    assert acts, "some simulated shopper clicked"
    for q, a in acts.items():
        for x in a:
            assert live.served["personal"][q][x.position - 1] == x.product_id  # on the served list
    # The feature worker applied the clicks: a shopper who clicked is known in Redis.
    clicked = next(x for x in searches if x.query_id in acts)
    shopper = world.shoppers[clicked.shopper]
    user = shopper.user_id
    store = RedisStore(connect(live.settings.redis), live.settings.features)
    feats = read_batch(
        store,
        [Request.for_text(user, clicked.text, world.product_ids[:3])],
        searches[-1].time.timestamp() + 3600,
    )[0]
    assert feats.features[0, INDEX["user_has_history"]] == 1.0
    # Their click counted where they searched from (the search's location), for anyone there.
    there = read_batch(
        store,
        [Request.for_text("someone", "x", world.product_ids[:3],
                          context=QueryContext(location=shopper.location))],
        searches[-1].time.timestamp() + 3600,
    )[0]
    assert there.features[0, INDEX["context_location_clicks_log"]] > 0
    # The nonpersonal arm's searches (the same, by a hidden shopper) never reached the features.
    hidden = read_batch(
        store,
        [Request.for_text(f"anon-{clicked.query_id}", clicked.text, world.product_ids[:3])],
        searches[-1].time.timestamp() + 3600,
    )[0]
    assert hidden.features[0, INDEX["user_searches_log"]] == 0.0
    f = figures(world, searches, live.served)
    assert 0 < f["ndcg@10"]["personal"] <= 1 and f["ndcg@10"]["oracle"] >= f["ndcg@10"]["population"] - 0.05
