"""Per (normalized query text, product): decayed clicks, add-to-carts and purchases that followed
that query, and the same totals per query, so a product's share of a query's clicks.

This is the evidence that makes navigational queries ("iphone 15 case") easy. Clicks carry a
``query_id``, not the text: a Query stores ``qt:{query_id}`` -> text (TTL), and a click whose query
has not been seen yet waits in ``qp:{query_id}`` until it is (see :mod:`features.lua`). Layout:
4 little-endian doubles ``[t_ref, clicks, carts, purchases]``, commutative like items.
"""

from __future__ import annotations

import struct
from typing import Final

from features import decay

T, CLICKS, CARTS, PURCHASES = 0, 1, 2, 3
N_DECAYED: Final = 3
SIZE: Final = 4
EMPTY: Final = (0.0,) * SIZE
_layout = struct.Struct(f"<{SIZE}d")


def apply(state: tuple[float, ...], kind: int, t: float, half_life: float) -> tuple[float, ...]:
    """One click (1), add-to-cart (2) or purchase (3) after the query, at event time ``t``."""
    return tuple(decay.bump(state, N_DECAYED, kind, t, half_life))


def encode(state: tuple[float, ...]) -> bytes:
    return _layout.pack(*state)


def decode(data: bytes | None) -> tuple[float, ...]:
    return EMPTY if data is None else _layout.unpack(data)
