"""Text normalization shared by every package, so the same query always meets the same key."""

from __future__ import annotations

import re
import unicodedata

from core.events import CatalogProduct

_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_query(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: ``" Call of Duty: MW3!"`` -> ``"call of duty mw3"``.

    Apostrophes are deleted (``"assassin's"`` -> ``"assassins"``) rather than split, so the
    possessive and the plain spelling that shoppers type meet; every other punctuation mark
    becomes a space (``"spider-man"`` -> ``"spider man"``). Unicode is NFKC-folded first, so
    full-width and compatibility characters match their plain forms.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", _APOSTROPHES.sub("", folded)).split())


def product_text(p: CatalogProduct) -> str:
    """What the ranker's encoders read of a product: title, brand, deepest categories, start of
    the description. Here, not in the trainer, because the scorer (no torch) reads it too."""
    parts = [p.title]
    if p.brand:
        parts.append(p.brand)
    parts.extend(p.category_path[-2:])
    if p.description:
        parts.append(p.description[:300])
    return " | ".join(parts)
