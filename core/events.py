"""The event contract: one definition of every event, JSON on the wire, validated at every boundary.

Field names follow what shops already publish (Segment's e-commerce spec, GA4 items, OpenSearch
UBI); the README maps them. Every event carries ``type`` (the tag that says which struct it is)
and ``schema_version``. Unknown extra fields are ignored, so producers can send richer payloads;
missing or ill-typed known fields are rejected with a reason that names the field, e.g.
``Expected `float` >= 0.0 - at `$.price```.

msgspec decodes and validates in one pass in C (hundreds of thousands of events a second per
core), so validation is never the bottleneck of a worker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Generic, TypeVar

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION: Final = 1

Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^\S+$")]
Text = Annotated[str, Meta(min_length=1, max_length=512)]
Money = Annotated[float, Meta(ge=0.0, le=10_000_000.0)]
Position = Annotated[int, Meta(ge=1, le=10_000)]
Timestamp = Annotated[datetime, Meta(tz=True)]
Version = Annotated[int, Meta(ge=1, le=SCHEMA_VERSION)]
Candidates = Annotated[list[Id], Meta(max_length=1000)]
Label = Annotated[str, Meta(max_length=128)]


class InvalidEvent(ValueError):
    """A payload that does not satisfy the contract. ``reason`` names the offending field."""

    def __init__(self, reason: str, payload: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload


class _Event(Struct, kw_only=True, frozen=True, tag_field="type"):
    schema_version: Version = SCHEMA_VERSION


# --- shopper searches -----------------------------------------------------------------------


class QueryContext(Struct, kw_only=True, frozen=True):
    """Where and on what the shopper searched. ``location``: ISO 3166-2 region, city, or store id."""

    location: Label | None = None
    device: Label | None = None
    locale: Label | None = None


class Query(_Event, kw_only=True, tag="query"):
    """A search. ``candidates`` are the product ids to rank; without them the scorer retrieves."""

    query_id: Id
    user_id: Id
    session_id: Id
    text: Text
    candidates: Candidates | None = None
    context: QueryContext = QueryContext()
    timestamp: Timestamp

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("Expected non-blank text - at `$.text`")


class RankedProduct(Struct, kw_only=True, frozen=True):
    """One product of a ranked list. ``position`` is 1-based, as Segment and UBI count it.

    ``features`` holds the feature values the scorer served for this product, so training sees
    exactly what was served (point-in-time correct).
    """

    product_id: Id
    score: float
    position: Position
    features: dict[str, float] | None = None


class RankedResult(_Event, kw_only=True, tag="ranked_result"):
    """What the scorer answered to a query: the impression the shopper was shown.

    ``error`` is set (and ``products`` empty) when the query could not be ranked; the reason is
    never dropped silently.
    """

    query_id: Id
    user_id: Id
    session_id: Id
    model_version: Label
    products: list[RankedProduct]
    latency_ms: Annotated[float, Meta(ge=0.0)] = 0.0
    error: str | None = None
    timestamp: Timestamp


# --- shopper actions on products ------------------------------------------------------------


class _Interaction(_Event, kw_only=True):
    """A shopper acting on a product; ``query_id``/``position`` are set when it came from a search."""

    event_id: Id
    user_id: Id
    session_id: Id
    product_id: Id
    query_id: Id | None = None
    position: Position | None = None
    price: Money | None = None
    quantity: Annotated[int, Meta(ge=1, le=10_000)] = 1
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")] = "USD"
    timestamp: Timestamp


class Click(_Interaction, kw_only=True, tag="click"):
    """Segment "Product Clicked", GA4 ``select_item``, UBI ``click``."""


class AddToCart(_Interaction, kw_only=True, tag="add_to_cart"):
    """Segment "Product Added", GA4 ``add_to_cart``."""


class Purchase(_Interaction, kw_only=True, tag="purchase"):
    """One purchased line of an order (Segment "Order Completed" products[], GA4 ``purchase``)."""

    order_id: Id
    price: Money


Interaction = Click | AddToCart | Purchase

# --- catalog and models ---------------------------------------------------------------------


class CatalogProduct(_Event, kw_only=True, tag="product"):
    """A product as the catalog knows it. Keyed by ``product_id`` on a compacted topic."""

    product_id: Id
    title: Annotated[str, Meta(min_length=1, max_length=1000)]
    description: Annotated[str, Meta(max_length=50_000)] = ""
    brand: Label | None = None
    category_path: Annotated[list[Label], Meta(max_length=16)] = []
    price: Money | None = None
    attributes: dict[Label, Annotated[str, Meta(max_length=2000)]] = {}
    released_at: Timestamp | None = None  # when it went (or goes) on sale; a pre-order is before it
    updated_at: Timestamp


class ModelUpdate(_Event, kw_only=True, tag="model_update"):
    """A validated model version, announced so every scorer hot-swaps to it."""

    model_version: Label
    parent_version: Label | None = None
    uri: Annotated[str, Meta(min_length=1, max_length=2000)]
    manifest_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    metrics: dict[Label, float] = {}
    created_at: Timestamp


Event = Query | RankedResult | Click | AddToCart | Purchase | CatalogProduct | ModelUpdate

# --- codec ----------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


T = TypeVar("T")


class Codec(Generic[T]):
    """Decodes and validates one kind of event (or a union of kinds) from JSON bytes."""

    def __init__(self, kind: Any) -> None:
        self._decoder = msgspec.json.Decoder(kind)

    def decode(self, payload: bytes) -> T:
        """Decode ``payload`` or raise :class:`InvalidEvent` naming the field that failed."""
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(str(exc), payload) from None
        except msgspec.DecodeError as exc:
            raise InvalidEvent(f"malformed JSON: {exc}", payload) from None


def encode(event: Event) -> bytes:
    """Serialize an event to the JSON bytes that go on the wire."""
    return _encoder.encode(event)


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as plain JSON-compatible Python values (for logs and HTTP responses)."""
    return msgspec.to_builtins(event)


QUERIES: Final = Codec[Query](Query)
RESULTS: Final = Codec[RankedResult](RankedResult)
INTERACTIONS: Final = Codec[Interaction](Interaction)
CATALOG: Final = Codec[CatalogProduct](CatalogProduct)
MODEL_UPDATES: Final = Codec[ModelUpdate](ModelUpdate)
ANY: Final = Codec[Event](Event)
