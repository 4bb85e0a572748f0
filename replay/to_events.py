"""Best Buy rows -> the contract's events (core.events), ordered as they happened.

- The catalog becomes one :class:`CatalogProduct` per sku (keyed by product id), stamped with the
  time of the dataset's first search: the catalog as the shop knew it when the log starts.
  ``price`` is the sale price (else the regular price); ``brand`` the manufacturer; release
  date, reviews and prices go in ``attributes``.
- Every search (click rows and unlabeled searches) becomes one :class:`Query` at its query time;
  rows of the same search share a query id and yield one Query.
- Every click row becomes one :class:`Click` at its click time, with the query id of its search,
  a stable ``event_id`` and the catalog price (``None`` for the 0.7% of clicks on skus the
  catalog lacks; those clicks are still published).

:func:`query_event` and :func:`click_event` are the one conversion of a Best Buy search and click
to the contract: the replay publishes them and the trainer replays them (``trainer.examples``), so
a click has one id everywhere.

The dataset has no sessions: ``session_id`` is the user id. Queries carry no candidates: for Best
Buy the candidate set is the whole catalog.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from core.events import CatalogProduct, Click, Event, Query
from core.topics import event_key, topic_field
from replay import bestbuy
from replay.bestbuy import ClickRow, Product, Search


class Stream(enum.Enum):
    """Which of the engine's topics an event of a replay belongs on (a
    :class:`~core.settings.TopicSettings` field: :func:`core.topics.topic_field`)."""

    CATALOG = "catalog"
    QUERIES = "queries"
    INTERACTIONS = "interactions"


@dataclass(frozen=True, slots=True)
class TimedEvent:
    """An event, when it happened and its id; where it goes is :func:`core.topics.route`'s."""

    timestamp: datetime
    event_id: str
    event: Event

    @property
    def stream(self) -> Stream:
        return Stream(topic_field(self.event))

    @property
    def key(self) -> str:
        return event_key(self.event)


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replay publishes: the catalog first, then ``events`` in timestamp order."""

    catalog: list[TimedEvent]
    events: list[TimedEvent]


def bestbuy_replay(data_dir: Path) -> Replay:
    """Load the Best Buy files and turn them into the ordered events of a replay."""
    products = bestbuy.load_catalog(data_dir)
    clicks = bestbuy.load_clicks(data_dir)
    searches = bestbuy.load_searches(data_dir)
    start = min(r.query_time for r in [*clicks, *searches])
    catalog = [catalog_event(p, start) for p in products.values()]
    return Replay(catalog=catalog, events=timeline(products, clicks, searches))


def timeline(
    products: Mapping[str, Product], clicks: Iterable[ClickRow], searches: Iterable[Search]
) -> list[TimedEvent]:
    """One Query per distinct search, one Click per click row, sorted by (time, queries first, id)."""
    clicks = list(clicks)
    queries: dict[str, TimedEvent] = {}
    for row in [*clicks, *searches]:
        queries.setdefault(row.query_id, _timed_query(row))
    events = [*queries.values(), *(_timed_click(c, products.get(c.sku)) for c in clicks)]
    order = {Stream.QUERIES: 0, Stream.INTERACTIONS: 1}
    return sorted(events, key=lambda e: (e.timestamp, order[e.stream], e.event_id))


def catalog_event(p: Product, updated_at: datetime) -> TimedEvent:
    return TimedEvent(updated_at, p.sku, catalog_product(p, updated_at))


def catalog_product(p: Product, updated_at: datetime) -> CatalogProduct:
    """The catalog's view of a product, as of ``updated_at``."""
    return CatalogProduct(
        product_id=p.sku,
        title=p.name,
        description=p.long_description or p.short_description,
        brand=p.manufacturer,
        category_path=list(p.category_path),
        price=p.price,
        attributes=_attributes(p),
        released_at=_midnight(p.release_date),
        updated_at=updated_at,
    )


def _midnight(day: date | None) -> datetime | None:
    return None if day is None else datetime(day.year, day.month, day.day, tzinfo=UTC)


def _attributes(p: Product) -> dict[str, str]:
    values = {
        "type": p.type,
        "short_description": p.short_description,
        "category_ids": "|".join(p.category_ids),
        "regular_price": p.regular_price,
        "sale_price": p.sale_price,
        "start_date": p.start_date,
        "customer_review_count": p.review_count,
        "customer_review_average": p.review_average,
    }
    return {k: str(v)[:2000] for k, v in values.items() if v not in (None, "")}


def query_event(*, query_id: str, user_id: str, text: str, query_time: datetime) -> Query:
    """A search as the contract's :class:`Query` (the dataset has no sessions: the user's id)."""
    return Query(query_id=query_id, user_id=user_id, session_id=user_id, text=text, timestamp=query_time)


def click_event(*, query_id: str, user_id: str, sku: str, query: str, query_time: datetime,
                click_time: datetime, price: float | None = None) -> Click:
    """A click as the contract's :class:`Click`, with its stable id (:func:`bestbuy.click_id`)."""
    return Click(
        event_id=bestbuy.click_id(user_id, sku, query, query_time, click_time),
        user_id=user_id,
        session_id=user_id,
        product_id=sku,
        query_id=query_id,
        price=price,
        timestamp=click_time,
    )


def _timed_query(row: ClickRow | Search) -> TimedEvent:
    event = query_event(query_id=row.query_id, user_id=row.user_id, text=row.query, query_time=row.query_time)
    return TimedEvent(row.query_time, row.query_id, event)


def _timed_click(row: ClickRow, product: Product | None) -> TimedEvent:
    event = click_event(query_id=row.query_id, user_id=row.user_id, sku=row.sku, query=row.query,
                        query_time=row.query_time, click_time=row.click_time,
                        price=product.price if product else None)
    return TimedEvent(row.click_time, event.event_id, event)
