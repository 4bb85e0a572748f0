"""Text normalization shared by every package, so the same query always meets the same key."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

from core.events import CatalogProduct

_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_NON_WORD = re.compile(r"[\W_]+")
# A letter followed by a digit or a digit by a letter: "xbox360" -> "xbox 360", "mw3" -> "mw 3".
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")
# Words that change no product's meaning in a shopper's query ("star wars for ds").
_STOPWORDS: Final = frozenset(
    {"a", "an", "and", "by", "for", "in", "of", "on", "or", "the", "to", "with"}
)


def words(text: str) -> list[str]:
    """Lowercase words without punctuation: ``" Call of Duty: MW3!"`` -> ``["call", "of", "duty", "mw3"]``.

    Apostrophes are deleted (``"assassin's"`` -> ``"assassins"``) rather than split, so the
    possessive and the plain spelling that shoppers type meet; every other punctuation mark
    separates words (``"spider-man"`` -> ``["spider", "man"]``). Unicode is NFKC-folded first, so
    full-width and compatibility characters match their plain forms. BM25 tokenizes with this.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _NON_WORD.sub(" ", _APOSTROPHES.sub("", folded)).split()


@lru_cache(maxsize=65536)  # shoppers repeat queries (85-89% of Best Buy's texts recur)
def normalize_query(text: str) -> str:
    """The key under which a query's evidence is kept: one key for the spellings of one query.

    Its :func:`query_words` joined *without* spaces: ``"xbox360 kinect"``, ``"Kinect for Xbox
    360"`` and ``"kinects xbox 360"`` all give ``"360kinectxbox"``, and ``"rock smith"`` meets
    ``"rocksmith"``. Shoppers type the same query in many ways; each way alone has few clicks,
    pooled they say which product the query means (on the Best Buy time split, pooling raises
    the online query table from 0.731 to 0.738 MAP@5 and the ranker more). The key is not
    meant to be read: models read the query as typed. ``""`` when the text has no word; a key
    never holds whitespace, ``:`` or ``_`` (features.keys builds Redis keys from it).
    """
    return query_key(query_words(text))


def query_key(words: Iterable[str]) -> str:
    """The key of a query made of these :func:`query_words` (in any order, repeats allowed)."""
    return "".join(sorted(set(words)))


@lru_cache(maxsize=65536)
def query_words(text: str) -> tuple[str, ...]:
    """The words a query's evidence is also kept under, one by one (a query never seen as a whole
    is mostly made of words seen before).

    The :func:`words`, split where letters meet digits, without stopwords, plural ``s`` dropped,
    deduplicated and sorted: ``"Kinect for Xbox360"`` -> ``("360", "kinect", "xbox")``.
    """
    tokens = _LETTER_DIGIT.sub(" ", " ".join(words(text))).split()
    kept = [t for t in tokens if t not in _STOPWORDS] or tokens
    return tuple(sorted({_singular(t) for t in kept}))


def _singular(token: str) -> str:
    """``"games"`` -> ``"game"``; short words and ``-ss`` endings (``"bass"``) are left alone."""
    if len(token) > 3 and token.endswith("s") and not token.endswith("ss"):
        return token[:-1]
    return token


# A product's two texts. They differ on purpose, and each method's reported figures were measured
# with its own: making them one would change those figures (bench/results/quality.json).


def product_text(p: CatalogProduct) -> str:
    """What the ranker's encoders (the product tower) read of a product: title, brand, deepest
    categories, start of the description. Here, not in the trainer, because the scorer (no
    torch) reads it too."""
    parts = [p.title]
    if p.brand:
        parts.append(p.brand)
    parts.extend(p.category_path[-2:])
    if p.description:
        parts.append(p.description[:300])
    return " | ".join(parts)


def product_long_text(p: CatalogProduct) -> str:
    """What the text-only methods read of a product: its title, then its whole description
    (BM25 and zero-shot MiniLM in :mod:`evaluation.baselines`, CrowdFlower's fine-tuned text
    model in :mod:`trainer.text_ranker`, which embeds products as zero-shot MiniLM does)."""
    return f"{p.title}. {p.description}" if p.description else p.title
