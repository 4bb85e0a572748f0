"""SIMULATION: how much of the oracle's gain the data of a run can give any ranker.

The oracle knows each shopper's preferences exactly. An engine can know only what its shoppers
did. This is the reference between them: a learner that knows the simulator's *form*
(:mod:`sim.world`: base relevance, the preference terms and their strengths, the cascade's
patience per device) but, of each shopper, only what the served lists and their clicks showed
before each search. It ranks the catalog by ``rel(q, p) * exp(estimated pref(u, p))``, with:

- taste: the belief that the shopper likes a taste group, ``c / (c + TASTE_PRIOR)``, ``c`` their
  clicks in the group;
- price sensitivity: minus the mean standardized log price of the shopper's clicks, shrunk by
  ``n / (n + PRICE_PRIOR)`` (``n`` clicks);
- region: per region and product, log((clicks + REGION_PRIOR) / (expected + REGION_PRIOR)), the
  expected clicks being what the region's served lists would have drawn at base relevance
  (exposure: position x device patience). The region (location) and the device are observable.

Edition taste is left out: from a few clicks its estimate cost NDCG rather than added any. The
priors were chosen on seed 0 among a few values each (docs/personalization.md) and held on seeds
1 and 2; a cleverer learner may do better, so the figure is a reference, not a proof of a ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sim.world import Interaction, SimSearch, World, ndcg_at, ranking

TASTE_PRIOR = 10.0
PRICE_PRIOR = 10.0
REGION_PRIOR = 1.0


def learner_ndcg(
    world: World,
    searches: Sequence[SimSearch],
    served: Mapping[str, Sequence[str]],
    actions: Mapping[str, Sequence[Interaction]],
) -> np.ndarray:
    """NDCG@10 per search (``searches`` in time order) of the learner described above, learning
    from the lists ``served`` and the ``actions`` they drew, as they happened."""
    p, strengths = world.params, world.params.strengths()
    n_products, n_groups = len(world.product_ids), len(world.group_names)
    clicks = np.zeros((p.shoppers, n_products))  # each shopper's own clicks per product
    region_clicks = np.zeros((p.regions, n_products))
    region_expected = np.zeros((p.regions, n_products))
    out = np.zeros(len(searches))
    for i, x in enumerate(searches):
        u = world.shoppers[x.shopper]
        rel = world.population(x.key)
        own = clicks[x.shopper]
        n = own.sum()
        in_group = np.bincount(world.group, weights=own, minlength=n_groups)
        pref = strengths["taste"] * (in_group / (in_group + TASTE_PRIOR))[world.group]
        if n > 0:  # the clicks' mean standardized log price, negated, times n / (n + PRICE_PRIOR)
            sensitivity = -float(own @ world.zprice) / (n + PRICE_PRIOR)
            pref -= strengths["price"] * sensitivity * world.zprice
        pref += strengths["region"] * np.log(
            (region_clicks[u.region] + REGION_PRIOR) / (region_expected[u.region] + REGION_PRIOR)
        )
        out[i] = ndcg_at(ranking(rel * np.exp(pref), seed=i), world.attractiveness(x.shopper, x.key))
        # What this search showed the learner: the list (exposure) and its clicks.
        cols = np.array([world.column[pid] for pid in served.get(x.query_id, ()) if pid in world.column],
                        dtype=np.int64)
        if len(cols):
            patience = p.mobile_patience if u.mobile else p.desktop_patience
            looked = patience ** np.arange(len(cols))
            region_expected[u.region, cols] += looked * p.top_attractiveness * rel[cols] / rel.max()
        for a in actions.get(x.query_id, ()):
            if a.kind == "click" and (col := world.column.get(a.product_id)) is not None:
                clicks[x.shopper, col] += 1
                region_clicks[u.region, col] += 1
    return out
