"""Best Buy mobile search (Kaggle "acm-sf-chapter-hackathon-small", Xbox 360 games, Aug-Oct 2011).

Three files under ``<data_dir>/bestbuy`` (see its SOURCE.md):

- the catalog, from the product XML: 437 products (each listed twice, identically; the first kept);
- clicks: one row per click, with the search that led to it (user, query text, query time);
- unlabeled searches: searches whose clicked sku the competition withheld.

Times have no zone in the source and are read as UTC. A search is identified by
:func:`query_id` (a stable hash of user, query time and text): a click and its search share it,
and several clicks on one search (about 2k rows) share one query id.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")

FOLDER: Final = "bestbuy"
CATALOG_ZIP: Final = "small_product_data.xml.zip"
CLICKS_CSV: Final = "clicks_train_full.csv.gz"
SEARCHES_CSV: Final = "kaggle_test_unlabeled.csv.gz"


@dataclass(frozen=True, slots=True)
class Product:
    """One catalog product as the XML describes it. ``category_path`` runs from the root down."""

    sku: str
    name: str
    type: str
    short_description: str
    long_description: str
    category_path: tuple[str, ...]
    category_ids: tuple[str, ...]
    manufacturer: str | None
    regular_price: float | None
    sale_price: float | None
    review_count: int | None
    review_average: float | None
    release_date: date | None
    start_date: date | None

    @property
    def price(self) -> float | None:
        """What a shopper paid: the sale price, or the regular price when there is none."""
        return self.sale_price if self.sale_price is not None else self.regular_price


@dataclass(frozen=True, slots=True)
class Search:
    """A search: who searched what, when. ``click_time`` is when its (withheld) click happened."""

    query_id: str
    user_id: str
    query: str
    category: str
    query_time: datetime
    click_time: datetime


@dataclass(frozen=True, slots=True)
class ClickRow:
    """A click on ``sku`` after the search ``query_id`` (``query``, ``query_time``) by ``user_id``."""

    query_id: str
    user_id: str
    sku: str
    query: str
    category: str
    query_time: datetime
    click_time: datetime

    @property
    def click_id(self) -> str:
        """A stable id for this click (the same on every load and every replay)."""
        return click_id(self.user_id, self.sku, self.query, self.query_time, self.click_time)


def click_id(user_id: str, sku: str, query: str, query_time: datetime, click_time: datetime) -> str:
    """The id of a click: the event id it is published with, and the one training replays it with."""
    return stable_id("click", user_id, sku, query, _iso(query_time), _iso(click_time))


def stable_id(*parts: str) -> str:
    """A short, stable, collision-resistant id from its parts (blake2b, 16 bytes, hex)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def query_id(user_id: str, query_time: datetime, query: str) -> str:
    """The id of a search: the same for a click row and an unlabeled row of the same search."""
    return stable_id("query", user_id, _iso(query_time), query)


def parse_time(text: str) -> datetime:
    """``2011-08-11 03:59:04.27`` (no zone, 0-3 decimals) -> an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds")


# --- catalog ----------------------------------------------------------------------------------


def load_catalog(data_dir: Path) -> dict[str, Product]:
    """The catalog keyed by sku, in the XML's order (first occurrence of each sku)."""
    with zipfile.ZipFile(data_dir / FOLDER / CATALOG_ZIP) as archive:
        root = ET.fromstring(archive.read(archive.namelist()[0]))
    products: dict[str, Product] = {}
    for element in root.iter("product"):
        product = _product(element)
        products.setdefault(product.sku, product)
    return products


def _product(e: ET.Element) -> Product:
    path = e.findall("categoryPath/category")
    return Product(
        sku=_text(e, "sku"),
        name=_text(e, "name"),
        type=_text(e, "type"),
        short_description=_text(e, "shortDescription"),
        long_description=_text(e, "longDescription"),
        category_path=tuple(_text(c, "name") for c in path),
        category_ids=tuple(_text(c, "id") for c in path),
        manufacturer=_text(e, "manufacturer") or None,
        regular_price=_optional(e, "regularPrice", float),
        sale_price=_optional(e, "salePrice", float),
        review_count=_optional(e, "customerReviewCount", int),
        review_average=_optional(e, "customerReviewAverage", float),
        release_date=_optional(e, "releaseDate", date.fromisoformat),
        start_date=_optional(e, "startDate", date.fromisoformat),
    )


def _text(e: ET.Element, tag: str) -> str:
    return (e.findtext(tag) or "").strip()


def _optional(e: ET.Element, tag: str, parse: Callable[[str], T]) -> T | None:
    text = _text(e, tag)
    return parse(text) if text else None


# --- searches and clicks ----------------------------------------------------------------------


def load_clicks(data_dir: Path) -> list[ClickRow]:
    """Every click row, in the file's order (sorted by query time)."""
    return [
        ClickRow(
            query_id=query_id(r["user"], qt := parse_time(r["query_time"]), r["query"]),
            user_id=r["user"],
            sku=r["sku"],
            query=r["query"],
            category=r["category"],
            query_time=qt,
            click_time=parse_time(r["click_time"]),
        )
        for r in _rows(data_dir / FOLDER / CLICKS_CSV)
    ]


def load_searches(data_dir: Path) -> list[Search]:
    """The unlabeled searches (the competition's test file), in the file's order."""
    return [
        Search(
            query_id=query_id(r["user"], qt := parse_time(r["query_time"]), r["query"]),
            user_id=r["user"],
            query=r["query"],
            category=r["category"],
            query_time=qt,
            click_time=parse_time(r["click_time"]),
        )
        for r in _rows(data_dir / FOLDER / SEARCHES_CSV)
    ]


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)
