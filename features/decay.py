"""Exponentially decayed sums in event time.

A decayed sum ``S(T) = sum_i w_i * 2 ** (-(T - t_i) / h)`` is kept as ``(value, t_ref)`` with
``value = S(t_ref)`` and ``t_ref`` the latest event time seen. Adding an event older than
``t_ref`` discounts it instead of moving ``t_ref``, so the result does not depend on arrival order
(up to float rounding). Several sums that share a half-life share one ``t_ref``.

The Redis commit script (:mod:`features.lua`) repeats :func:`add` operation for operation, so the
online and offline stores give bit-identical doubles (both call the C library's ``pow``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def factor(dt: float, half_life: float) -> float:
    """How much a weight shrinks over ``dt`` seconds."""
    return 2.0 ** (-dt / half_life)


def add(
    values: Sequence[float], t_ref: float, slot: int, weight: float, t: float, half_life: float
) -> tuple[list[float], float]:
    """Add ``weight`` at time ``t`` to ``values[slot]``; all ``values`` decay together."""
    out = list(values)
    if t > t_ref:
        f = 2.0 ** (-(t - t_ref) / half_life)
        for i in range(len(out)):
            out[i] = out[i] * f
        out[slot] = out[slot] + weight
        return out, t
    out[slot] = out[slot] + weight * 2.0 ** (-(t_ref - t) / half_life)
    return out, t_ref


def value_at(value: float, t_ref: float, now: float, half_life: float) -> float:
    """The sum as of ``now`` (as of ``t_ref`` when ``now`` is earlier: nothing is un-applied)."""
    if now <= t_ref:
        return value
    return value * 2.0 ** (-(now - t_ref) / half_life)


def values_at(values: np.ndarray, t_ref: np.ndarray, now: float, half_life: float) -> np.ndarray:
    """:func:`value_at` for many sums: ``values`` [n, k] sharing each row's ``t_ref`` [n]."""
    return values * (2.0 ** (-np.maximum(now - t_ref, 0.0) / half_life))[:, None]


def bump(state: Sequence[float], n_decayed: int, slot: int, t: float, half_life: float) -> list[float]:
    """Add one at time ``t`` to ``state[slot]``, where ``state[0]`` is the shared reference time and
    ``state[1 : 1 + n_decayed]`` the decayed sums (fixed-layout states of items and queries).
    Mirrored line for line by ``bump`` in :mod:`features.lua`."""
    out = list(state)
    values, t_ref = add(out[1 : 1 + n_decayed], out[0], slot - 1, 1.0, t, half_life)
    out[1 : 1 + n_decayed] = values
    out[0] = t_ref
    return out


def merge(states: np.ndarray, at: int, n_decayed: int, half_life: float) -> None:
    """Merge one decayed group of the shards' states ``states`` [shards, n, size] into
    ``states[0]``, in place: the latest reference time, and each shard's sums decayed to it and
    added in shard order (the same doubles whichever store holds the shards)."""
    t = states[:, :, at]
    latest = t.max(axis=0)
    factors = 2.0 ** (-(latest[None, :] - t) / half_life)
    sums = states[:, :, at + 1 : at + 1 + n_decayed] * factors[:, :, None]
    total = sums[0]
    for part in sums[1:]:
        total = total + part
    states[0, :, at + 1 : at + 1 + n_decayed] = total
    states[0, :, at] = latest
