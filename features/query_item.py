"""Per (normalized query text, product): decayed clicks, add-to-carts and purchases that followed
that query, and the same totals per query, so a product's share of a query's clicks.

This is the evidence that makes navigational queries ("iphone 15 case") easy. Each interaction is
also counted under each of the query's words (keys ``_{word}``), so a query never seen as a whole
still finds the products its words led to ("ps3 move bundle" after "move bundle" and "ps3").

Clicks carry a ``query_id``, not the text: a Query stores ``qt:{query_id}`` -> :func:`stored_text`
(TTL), and a click whose query has not been seen yet waits in ``qp:{query_id}`` until it is (see
:mod:`features.lua`). Layout: 4 little-endian doubles ``[t_ref, clicks, carts, purchases]``,
commutative like items, then ``[t_burst, burst_clicks]``: clicks again, decayed with the short
``query_burst_half_life_s`` (what a busy query leads to this afternoon).
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Final

import numpy as np

from core.text import normalize_query, query_words
from features import decay

T, CLICKS, CARTS, PURCHASES, T_BURST, BURST_CLICKS = 0, 1, 2, 3, 4, 5
N_DECAYED: Final = 3
SIZE: Final = 6
EMPTY: Final = (0.0,) * SIZE
_layout = struct.Struct(f"<{SIZE}d")
WORD: Final = "_"  # a word's key is "_" + word; normalized queries never hold "_"


def word_key(word: str) -> str:
    return WORD + word


@lru_cache(maxsize=65536)
def stored_text(text: str) -> str:
    """What a query leaves for its clicks to join: its key, then its words, space separated."""
    key = normalize_query(text)
    return " ".join((key, *query_words(text))) if key else ""


def evidence_keys(stored: str) -> list[str]:
    """The keys an interaction after a query counts under: the query's key and each word's key.
    (A text stored before words were kept is its key alone.)"""
    return [stored.split(" ", 1)[0], *map(word_key, stored_words(stored))]


def stored_words(stored: str) -> list[str]:
    """The words of a :func:`stored_text`."""
    return stored.split(" ")[1:]


def apply(state: tuple[float, ...], kind: int, t: float, half_life: float,
          burst_half_life: float) -> tuple[float, ...]:
    """One click (1), add-to-cart (2) or purchase (3) after the query, at event time ``t``."""
    main = decay.bump(state[:T_BURST], N_DECAYED, kind, t, half_life)
    burst = list(state[T_BURST:])
    if kind == CLICKS:
        burst = decay.bump(burst, 1, 1, t, burst_half_life)
    return (*main, *burst)


def merge(states: np.ndarray, half_life: float, burst_half_life: float) -> np.ndarray:
    """One state per row from the owner shards' [shards, n, SIZE] (:class:`features.keys.Shards`):
    each decayed group brought to its latest reference time and added."""
    if len(states) == 1:
        return states[0]
    states = states.copy()
    decay.merge(states, T, N_DECAYED, half_life)
    decay.merge(states, T_BURST, 1, burst_half_life)
    return states[0]


def encode(state: tuple[float, ...]) -> bytes:
    return _layout.pack(*state)


def decode(data: bytes | None) -> tuple[float, ...]:
    """A state; one written before the burst counter existed (4 doubles) reads it as zeros."""
    if data is None:
        return EMPTY
    if len(data) < _layout.size:
        return struct.unpack(f"<{len(data) // 8}d", data) + EMPTY[len(data) // 8:]
    return _layout.unpack(data)
