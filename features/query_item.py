"""Per (normalized query text, product): decayed clicks, add-to-carts and purchases that followed
that query, and the same totals per query, so a product's share of a query's clicks.

This is the evidence that makes navigational queries ("iphone 15 case") easy. Each interaction is
also counted under each of the query's words (keys ``_{word}``), so a query never seen as a whole
still finds the products its words led to ("ps3 move bundle" after "move bundle" and "ps3").
And under the search's context (:func:`context_keys`): where and on what the shopper searched,
e.g. ``@location:US-CA`` and ``@location`` (every located search's), so a product's share of one
region's clicks can be set against its share of all regions' (its regional lift).

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

from core.events import QueryContext
from core.text import normalize_query, query_words
from features import decay

T, CLICKS, CARTS, PURCHASES, T_BURST, BURST_CLICKS = 0, 1, 2, 3, 4, 5
N_DECAYED: Final = 3
SIZE: Final = 6
EMPTY: Final = (0.0,) * SIZE
_layout = struct.Struct(f"<{SIZE}d")
WORD: Final = "_"  # a word's key is "_" + word; normalized queries never hold "_"
CONTEXT: Final = "@"  # a context key starts with "@"; query keys and words never hold it
#: The context dimensions (:class:`core.events.QueryContext` fields) whose clicks are kept.
CONTEXT_DIMENSIONS: Final = ("location", "device")


def word_key(word: str) -> str:
    return WORD + word


def context_key(dimension: str, label: str | None = None) -> str:
    """``@location:US-CA``: what followed searches from there; ``@location`` (no label): what
    followed every search that said where it came from, the reference its shares are set against.
    Whitespace in a label becomes ``_`` (stored texts are space separated)."""
    return f"{CONTEXT}{dimension}" if label is None else f"{CONTEXT}{dimension}:{'_'.join(label.split())}"


def context_labels(context: QueryContext | None) -> list[tuple[str, str]]:
    """The dimensions a search's context names (a blank label names none), with their labels."""
    if context is None:
        return []
    return [(dim, label) for dim in CONTEXT_DIMENSIONS if (label := getattr(context, dim)) and label.strip()]


def context_keys(context: QueryContext | None) -> tuple[str, ...]:
    """The context keys a search's clicks count under: for each dimension it names, the
    dimension's reference key and its value's."""
    return tuple(key for dim, label in context_labels(context)
                 for key in (context_key(dim), context_key(dim, label)))


@lru_cache(maxsize=65536)
def stored_text(text: str, context: tuple[str, ...] = ()) -> str:
    """What a query leaves for its clicks to join: its key, then its words, then its
    :func:`context_keys`, space separated. "" for a text without words (nothing is kept)."""
    key = normalize_query(text)
    return " ".join((key, *query_words(text), *context)) if key else ""


def evidence_keys(stored: str) -> list[str]:
    """The keys an interaction after a query counts under: the query's key, each word's key and
    each context key. (A text stored before words were kept is its key alone.)"""
    key, *rest = stored.split(" ")
    return [key, *(t if t.startswith(CONTEXT) else word_key(t) for t in rest)]


def stored_words(stored: str) -> list[str]:
    """The words of a :func:`stored_text`."""
    return [t for t in stored.split(" ")[1:] if not t.startswith(CONTEXT)]


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
