"""What the shopper's current session says about a candidate (issue 18): a separate, additive family.

A session is a shopper's run of searches with no gap longer than ``FeatureSettings.session_gap_s``
(30 min by default) between consecutive ones. Two columns, read for the candidates of a search
from what happened earlier in its session and before the search (nothing later):

- ``session_click_similarity``: the highest cosine between the candidate's product vector and
  those of the products clicked earlier in the session (0 when none);
- ``session_query_share``: the highest share of the candidate among the clicks that followed each
  of the session's earlier query texts, as the feature store reads it (``query_item_click_share``
  of that text): a reformulation "mw3" -> "modern warfare 3 hardened" carries the first text's
  evidence to the second.

Nothing here is stored in Redis: both columns are computed from the session's earlier searches
and the store's existing query evidence (features.read), so the layout (features/keys.py) does not
change. They are not among ``FEATURE_NAMES``; evaluation.personal measures them as a blend with the
model's scores before anything serves them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from features.read import INDEX, Request, read_batch
from features.store import FeatureStore

SESSION_NAMES: Final = ("session_click_similarity", "session_query_share")


@dataclass(frozen=True)
class Search:
    """One search as sessions see it: who, which, when (epoch seconds), what was typed."""

    user_id: str
    query_id: str
    time: float
    text: str


def sessions(searches: Iterable[Search], gap_s: float) -> dict[str, tuple[str, int]]:
    """query_id -> (session id, position of the search in its session, 0 = first).

    A shopper's searches in time order; a gap longer than ``gap_s`` starts a new session. The
    anonymous shopper ("" or "anonymous") has no sessions: each of its searches is alone."""
    if gap_s <= 0:
        raise ValueError(f"gap_s must be > 0, got {gap_s}")
    by_user: dict[str, list[Search]] = defaultdict(list)
    for s in searches:
        by_user[s.user_id].append(s)
    out: dict[str, tuple[str, int]] = {}
    for user, mine in by_user.items():
        mine.sort(key=lambda s: (s.time, s.query_id))
        number, position, last = 0, 0, None
        for s in mine:
            if s.query_id in out:
                continue
            if user in ("", "anonymous"):
                out[s.query_id] = (f"{user}#{s.query_id}", 0)
                continue
            if last is not None and s.time - last > gap_s:
                number, position = number + 1, 0
            out[s.query_id] = (f"{user}#{number}", position)
            position, last = position + 1, s.time
    return out


def click_similarity(candidates: np.ndarray, clicked: np.ndarray) -> np.ndarray:
    """Max cosine of each candidate vector [C, D] to the clicked vectors [K, D] (L2-normalized);
    zeros when K = 0."""
    if len(clicked) == 0:
        return np.zeros(len(candidates), dtype=np.float32)
    return (candidates @ clicked.T).max(axis=1).astype(np.float32)


def query_share(store: FeatureStore, user_id: str, earlier_texts: Sequence[str], candidates: Sequence[str],
                now: float) -> np.ndarray:
    """Max over the earlier texts of the candidate's share of that text's clicks, as of ``now``."""
    texts = list(dict.fromkeys(t for t in earlier_texts if t))
    if not texts:
        return np.zeros(len(candidates), dtype=np.float32)
    results = read_batch(store, [Request.for_text(user_id, t, candidates) for t in texts], now)
    column = INDEX["query_item_click_share"]
    return np.max(np.stack([r.features[:, column] for r in results]), axis=0).astype(np.float32)
