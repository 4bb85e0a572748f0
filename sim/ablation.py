"""SIMULATION: which of the engine's features carry its personal gain, per preference dimension.

Each personal search is scored again, offline, exactly as it was served: the version that served
it, its query, its candidates, the feature matrix and the history the scorer read (the result's
served features). Then once per group of personal features with that group replaced by its
training mean (the version's ``feature_mean``, what the head reads when it knows nothing; the
shopper's history: none). The drop in NDCG@10 against the simulator's true attractiveness is what
the group carried. Replaying unablated reproduces the served ranking (``replayed``), which checks
the replay itself.

Groups, by the simulated preference they answer to (sim.world.DIMENSIONS):
- ``taste`` (franchise and genre): the shopper's category and brand affinities, their own
  interactions with the candidate, and the similarity to what they recently looked at (history);
  and each of those three alone (``taste.affinities``, ``taste.own_interactions``,
  ``taste.history``);
- ``edition`` and ``price`` both act through price, so one group: the price level and its cross;
- ``region``: the search location's lift and clicks;
- ``device``: its lift and clicks (the simulator's device changes how deep a shopper looks, not
  what they like, so nothing is expected here);
- ``all_personal``: every shopper feature and the history at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.events import ServedFeatures
from scorer.runtime import UNKNOWN_ROW, Batch, ServedModel, load_served_model
from sim.world import SimSearch, World, ndcg_at

HISTORY = "history"  # not a column: the recent products the interest similarity reads
GROUPS: dict[str, tuple[str, ...]] = {
    "taste": ("user_category_affinity", "user_brand_affinity", "user_item_interest", HISTORY),
    # ... and its parts, each alone:
    "taste.affinities": ("user_category_affinity", "user_brand_affinity"),
    "taste.own_interactions": ("user_item_interest",),
    "taste.history": (HISTORY,),
    "price_level": ("price_ratio_log", "price_level_cross"),
    "region": ("context_location_lift", "context_location_clicks_log"),
    "device": ("context_device_lift", "context_device_clicks_log"),
}


@dataclass(frozen=True)
class Served:
    """What the personal arm's scorer answered to one search."""

    products: list[str]  # in ranked order
    version: str
    features: ServedFeatures  # rows in ranked order, with the history as read


def engine_ablation(
    world: World,
    searches: Sequence[SimSearch],
    served: Mapping[str, Served],
    registry: Path,
    user_features: Sequence[str],
    nonpersonal: float,
) -> dict[str, Any]:
    """Mean NDCG@10 of the personal arm replayed, then without each group (:data:`GROUPS`, and
    ``all_personal``: ``user_features`` and the history), with each group's share of the
    engine's personal gain over ``nonpersonal`` (the non-personal arm's mean NDCG@10)."""
    groups = {**GROUPS, "all_personal": (*user_features, HISTORY)}
    ndcg = {name: np.zeros(len(searches)) for name in ("replayed", *groups)}
    same_order = 0
    by_version: dict[str, list[int]] = {}
    for i, x in enumerate(searches):
        by_version.setdefault(served[x.query_id].version, []).append(i)
    for version, indices in by_version.items():
        model = load_served_model(registry, version, device="cpu", threads=1)
        try:
            for i in indices:
                x = searches[i]
                s = served[x.query_id]
                gains = world.attractiveness(x.shopper, x.key)
                batch = _batch(model, x.text, s)
                scores = model.score(batch)[0]
                order = np.argsort(-scores, kind="stable")
                same_order += int(np.array_equal(order, np.arange(len(order))))
                ndcg["replayed"][i] = _ndcg(world, s.products, order, gains)
                for name, members in groups.items():
                    ablated = model.score(_without(model, batch, members))[0]
                    ndcg[name][i] = _ndcg(world, s.products, np.argsort(-ablated, kind="stable"), gains)
        finally:
            model.close()
    mean = {k: round(float(v.mean()), 4) for k, v in ndcg.items()}
    gain = mean["replayed"] - nonpersonal
    return {
        "what": "each personal search scored again by the version that served it, on the features it "
        "was served, with one group of personal features at its training mean (history: none)",
        "groups": {k: list(v) for k, v in groups.items()},
        "replayed": mean["replayed"],
        "replayed_in_served_order": round(same_order / max(1, len(searches)), 4),
        "without": {k: mean[k] for k in groups},
        # > 0: the group helped the ranking (replayed - without); < 0: it hurt
        "adds": {k: round(mean["replayed"] - mean[k], 4) for k in groups},
        "share_of_engine_gain_lost_without": {
            k: round((mean["replayed"] - mean[k]) / gain, 4) if gain > 0 else None for k in groups
        },
    }


def _batch(model: ServedModel, text: str, s: Served) -> Batch:
    n = len(s.products)
    k = min(model.history_len, len(s.features.history))
    hist_idx = np.full((1, model.history_len), UNKNOWN_ROW, np.int64)
    hist_w = np.zeros((1, model.history_len), np.float32)
    hist_idx[0, :k] = model.rows(list(s.features.history[:k]))
    hist_w[0, :k] = s.features.history_weights[:k]
    return Batch(
        query_emb=model.encode([text]),
        cand_idx=model.rows(s.products)[None, :],
        hist_idx=hist_idx,
        hist_w=hist_w,
        dense=s.features.matrix(n)[None, :, :].copy(),
        n_candidates=[n],
        candidates=[s.products],
    )


def _without(model: ServedModel, batch: Batch, members: Sequence[str]) -> Batch:
    """``batch`` with the named columns at their training means and, for :data:`HISTORY`, no history."""
    means = model.feature_means
    dense = batch.dense.copy()
    for name in members:
        if name in model.feature_names:
            j = model.feature_names.index(name)
            dense[:, :, j] = means[j]
    hist_w = np.zeros_like(batch.hist_w) if HISTORY in members else batch.hist_w
    return replace(batch, dense=dense, hist_w=hist_w)


def _ndcg(world: World, products: Sequence[str], order: np.ndarray, gains: np.ndarray) -> float:
    ranked = [products[j] for j in order]
    return ndcg_at([world.column[p] for p in ranked if p in world.column], gains)
