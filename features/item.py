"""Per-product features: decayed clicks, add-to-carts, purchases and impressions (so a smoothed
click-through rate), plain counters and the last interaction.

Products are shared by every shopper, so every worker updates them: the update is commutative
(decayed sums with one reference time, counters, a max), applied inside Redis by the commit
script, never read-modify-written by a worker. Layout: 10 little-endian doubles.
"""

from __future__ import annotations

import struct
from typing import Final, TypeVar

import numpy as np

from features import decay

CLICK: Final = 1
CART: Final = 2
PURCHASE: Final = 3
IMPRESSION: Final = 4

T, CLICKS, CARTS, PURCHASES, IMPRESSIONS = 0, 1, 2, 3, 4
N_CLICKS, N_CARTS, N_PURCHASES, N_IMPRESSIONS, LAST = 5, 6, 7, 8, 9
N_DECAYED: Final = 4
SIZE: Final = 10
EMPTY: Final = (0.0,) * SIZE
_layout = struct.Struct(f"<{SIZE}d")
FloatOrArray = TypeVar("FloatOrArray", float, np.ndarray)


def apply(state: tuple[float, ...], kind: int, t: float, half_life: float) -> tuple[float, ...]:
    """One interaction (``kind`` 1-3) or impression (4) at event time ``t``."""
    out = decay.bump(state, N_DECAYED, kind, t, half_life)
    out[kind + N_DECAYED] = out[kind + N_DECAYED] + 1
    if kind != IMPRESSION and t > out[LAST]:
        out[LAST] = t
    return tuple(out)


def merge(states: np.ndarray, half_life: float) -> np.ndarray:
    """One state per product from the owner shards' [shards, n, SIZE] (:class:`features.keys.Shards`):
    decayed sums to the latest reference time, counters added, the latest interaction."""
    if len(states) == 1:
        return states[0]
    states = states.copy()
    decay.merge(states, T, N_DECAYED, half_life)
    states[0, :, N_CLICKS:LAST] = states[:, :, N_CLICKS:LAST].sum(axis=0)
    states[0, :, LAST] = states[:, :, LAST].max(axis=0)
    return states[0]


def encode(state: tuple[float, ...]) -> bytes:
    return _layout.pack(*state)


def decode(data: bytes | None) -> tuple[float, ...]:
    return EMPTY if data is None else _layout.unpack(data)


def ctr(clicks: FloatOrArray, impressions: FloatOrArray, prior: float, strength: float) -> FloatOrArray:
    """Decayed clicks over decayed impressions, pulled toward ``prior`` (the stored sums: both
    decay alike); one product's or, as arrays, many products'."""
    return np.minimum(1.0, (clicks + prior * strength) / (impressions + strength))
