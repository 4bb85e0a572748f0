"""SIMULATION: the shopper simulator (sim.world) on the real Best Buy catalog and query texts."""

from __future__ import annotations

import numpy as np
import pytest

from core.events import INTERACTIONS, encode
from core.settings import Settings
from evaluation.splits import bestbuy_split
from sim.live import figures, interaction_events
from sim.world import DIMENSIONS, SimParams, World, ndcg_at, ranking


@pytest.fixture(scope="module")
def split():  # type: ignore[no-untyped-def]
    return bestbuy_split(Settings().data_dir)


@pytest.fixture(scope="module")
def world(split) -> World:  # type: ignore[no-untyped-def]
    return World(SimParams(shoppers=60, days=3, seed=7), split.catalog, split.train)


def test_params_are_checked() -> None:
    with pytest.raises(ValueError):
        SimParams(mobile_patience=1.5)
    with pytest.raises(ValueError):
        SimParams(taste_strength=-1)
    with pytest.raises(ValueError):
        SimParams(shoppers=0)
    assert SimParams().strengths(only=["price"]) == {
        "taste": 0.0,
        "edition": 0.0,
        "price": 1.0,
        "region": 0.0,
    }


def test_world_on_the_real_catalog(world: World, split) -> None:  # type: ignore[no-untyped-def]
    assert len(world.product_ids) == len(split.catalog)
    assert len(world.keys) > 100  # real query texts with enough training clicks
    assert all(t.strip() for t in world.texts.values())
    key = next(iter(world.keys))
    a = world.attractiveness(0, key)
    assert a.shape == (len(world.product_ids),) and a.max() == pytest.approx(world.params.top_attractiveness)
    assert (a > 0).all()
    # Base relevance comes from the training clicks: the query's most clicked product has rel 1.
    assert world.population(key).max() == 1.0


def test_schedule_returns_over_days(world: World, split) -> None:  # type: ignore[no-untyped-def]
    searches = world.schedule(split.cutoff)
    assert searches == sorted(searches, key=lambda s: (s.time, s.query_id))
    assert {s.day for s in searches} == {0, 1, 2}
    by_shopper: dict[int, set[int]] = {}
    for s in searches:
        by_shopper.setdefault(s.shopper, set()).add(s.day)
    assert any(len(days) > 1 for days in by_shopper.values())  # shoppers come back
    assert world.schedule(split.cutoff) == searches  # the seed fixes everything


def test_preferences_move_the_ideal_ranking(world: World, split) -> None:  # type: ignore[no-untyped-def]
    searches = world.schedule(split.cutoff)[:300]
    oracle, pop = [], []
    for i, s in enumerate(searches):
        gains = world.attractiveness(s.shopper, s.key)
        oracle.append(ndcg_at(ranking(world.oracle(s.shopper, s.key), seed=i), gains))
        pop.append(ndcg_at(ranking(world.population(s.key), seed=i), gains))
    assert np.mean(oracle) > np.mean(pop) + 0.05
    # With every preference dimension at 0 and no noise, everyone ranks alike: no gain to take.
    flat = World(
        SimParams(shoppers=10, days=2, seed=7, noise=0.0, **{f"{d}_strength": 0.0 for d in DIMENSIONS}),
        split.catalog,
        split.train,
    )
    s = flat.schedule(split.cutoff)[0]
    assert np.allclose(flat.oracle(s.shopper, s.key), flat.population(s.key))


def test_cascade_and_position_bias(world: World, split) -> None:  # type: ignore[no-untyped-def]
    searches = world.schedule(split.cutoff)
    s = searches[0]
    served = [world.product_ids[c] for c in ranking(world.oracle(s.shopper, s.key))]
    assert world.respond(s, served, seed=1) == world.respond(s, served, seed=1)
    # Deeper clicks are rarer: a position-biased cascade over the served list.
    positions = [
        a.position
        for i, x in enumerate(searches)
        for a in world.respond(x, [world.product_ids[c] for c in ranking(world.population(x.key))], i)
        if a.kind == "click"
    ]
    assert positions and np.mean(np.array(positions) <= 3) > 0.5
    patient = World(
        SimParams(
            shoppers=60,
            days=3,
            seed=7,
            mobile_patience=1.0,
            desktop_patience=1.0,
            top_attractiveness=0.05,
            continue_after_click=1.0,
        ),
        split.catalog,
        split.train,
    )
    impatient = World(
        SimParams(
            shoppers=60,
            days=3,
            seed=7,
            mobile_patience=0.1,
            desktop_patience=0.1,
            top_attractiveness=0.05,
            continue_after_click=1.0,
        ),
        split.catalog,
        split.train,
    )

    def depth(w: World) -> float:
        acts = [
            a.position
            for i, x in enumerate(w.schedule(split.cutoff))
            for a in w.respond(x, w.product_ids, i)
            if a.kind == "click"
        ]
        return float(np.mean(acts)) if acts else 0.0

    assert depth(patient) > depth(impatient)


def test_events_are_valid_contract_events(world: World, split) -> None:  # type: ignore[no-untyped-def]
    searches = world.schedule(split.cutoff)
    kinds = set()
    for i, x in enumerate(searches[:400]):
        acts = world.respond(x, [world.product_ids[c] for c in ranking(world.oracle(x.shopper, x.key))], i)
        for e in interaction_events(x, world.shoppers[x.shopper].user_id, acts):
            back = INTERACTIONS.decode(encode(e))
            assert back.query_id == x.query_id and back.position >= 1
            kinds.add(type(back).__name__)
    assert kinds == {"Click", "AddToCart", "Purchase"}


def test_figures_oracle_population_and_share(world: World, split) -> None:  # type: ignore[no-untyped-def]
    searches = world.schedule(split.cutoff)[:200]
    served = {
        "personal": {
            x.query_id: [world.product_ids[c] for c in ranking(world.oracle(x.shopper, x.key), i)]
            for i, x in enumerate(searches)
        },
        "nonpersonal": {
            x.query_id: [world.product_ids[c] for c in ranking(world.population(x.key), i)]
            for i, x in enumerate(searches)
        },
    }
    f = figures(world, searches, served)
    nd = f["ndcg@10"]
    assert nd["personal"] == nd["oracle"] and nd["nonpersonal"] == nd["population"]
    assert f["gain_share"] == 1.0
    assert set(f["ablation"]) == set(DIMENSIONS)


def test_the_learner_knows_nothing_before_the_data_and_learns_from_it(split) -> None:  # type: ignore[no-untyped-def]
    """sim.bound: with nothing served yet the learner ranks as the population ranking does; fed the
    lists a population ranking served and the clicks they drew, it beats that ranking on the later
    searches (each shopper's clicks, and each region's, say something), and stays below the oracle."""
    import zlib

    from sim.bound import learner_ndcg

    world = World(SimParams(shoppers=60, days=10, seed=7), split.catalog, split.train)
    searches = world.schedule(split.cutoff)
    served: dict[str, list[str]] = {}
    actions = {}
    population, oracle = np.zeros(len(searches)), np.zeros(len(searches))
    for i, x in enumerate(searches):
        gains = world.attractiveness(x.shopper, x.key)
        order = ranking(world.population(x.key), i)
        population[i] = ndcg_at(order, gains)
        oracle[i] = ndcg_at(ranking(world.oracle(x.shopper, x.key), i), gains)
        served[x.query_id] = [world.product_ids[c] for c in order[:100]]
        actions[x.query_id] = world.respond(x, served[x.query_id], seed=zlib.crc32(x.query_id.encode()))
    blind = learner_ndcg(world, searches, {}, {})
    assert np.array_equal(blind, population)
    learned = learner_ndcg(world, searches, served, actions)
    later = slice(len(searches) // 2, None)
    assert population[later].mean() < learned[later].mean() < oracle[later].mean()
    f = figures(world, searches, {"personal": served, "nonpersonal": served}, actions=actions)
    assert f["ndcg@10"]["learner"] == round(float(learned.mean()), 4)
    assert 0.0 < f["learner_gain_share"] < 1.0


def test_the_engine_ablation_replays_what_was_served(world: World, split, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Replayed unablated, every search comes back in its served order with its served NDCG; a group
    whose columns were served at their training means (and no history) takes nothing away."""
    from core.events import ServedFeatures
    from features.read import FEATURE_NAMES, FEATURE_SCHEMA
    from scorer.runtime import load_served_model
    from sim.ablation import GROUPS, HISTORY, Served, _batch, engine_ablation
    from tests.model_factory import tiny_version
    from trainer.pipeline import USER_FEATURES

    version = tiny_version(tmp_path, "tiny").version
    model = load_served_model(tmp_path, version, device="cpu", threads=1)
    means = model.feature_means
    rng = np.random.default_rng(3)
    searches = world.schedule(split.cutoff)[:12]
    products = world.product_ids[:40]
    served, expected = {}, []
    for x in searches:
        dense = rng.normal(size=(len(products), len(FEATURE_NAMES))).astype(np.float32)
        for name in GROUPS["region"]:  # served at their means: nothing for the ablation to take
            dense[:, FEATURE_NAMES.index(name)] = means[FEATURE_NAMES.index(name)]
        unranked = Served(products, version, ServedFeatures.pack(FEATURE_SCHEMA, dense))
        order = np.argsort(-model.score(_batch(model, x.text, unranked))[0], kind="stable")
        ranked = [products[j] for j in order]
        served[x.query_id] = Served(ranked, version, ServedFeatures.pack(FEATURE_SCHEMA, dense[order]))
        expected.append(ndcg_at([world.column[p] for p in ranked], world.attractiveness(x.shopper, x.key)))
    model.close()
    out = engine_ablation(world, searches, served, tmp_path, USER_FEATURES, nonpersonal=0.0)
    assert out["replayed_in_served_order"] == 1.0
    assert out["replayed"] == round(float(np.mean(expected)), 4)
    assert out["without"]["region"] == out["replayed"]
    every = set(out["groups"]["all_personal"])
    assert HISTORY in every and set(USER_FEATURES) <= every
    assert set(out["share_of_engine_gain_lost_without"]) == {*GROUPS, "all_personal"}
    assert out["adds"]["region"] == 0.0
