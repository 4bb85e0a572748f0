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

import base64
from datetime import datetime
from typing import Annotated, Any, Final, Generic, TypeVar

import msgspec
import numpy as np
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
    """One product of a ranked list. ``position`` is 1-based, as Segment and UBI count it."""

    product_id: Id
    score: float
    position: Position


class ServedFeatures(Struct, kw_only=True, frozen=True):
    """The model inputs the scorer served for a list, compact, so training sees exactly what was
    served (point-in-time correct) without a named map per product on the wire.

    ``values``: base64 of little-endian float32 [products in list order, features], the columns
    named by the version's feature ``schema`` (``features.read.FEATURE_SCHEMA`` names today's).
    ``history`` / ``history_weights``: the shopper's recent products and their weights as read.
    """

    schema: Label
    values: str
    history: list[Id] = []
    history_weights: list[float] = []

    def matrix(self, rows: int) -> np.ndarray:
        """The values as float32 [rows, features]; raises ValueError when the size does not fit."""
        flat = np.frombuffer(base64.b64decode(self.values), dtype="<f4")
        if rows == 0 or flat.size % rows:
            raise ValueError(f"served features hold {flat.size} values, not a multiple of {rows} rows")
        return flat.reshape(rows, flat.size // rows)

    @classmethod
    def pack(cls, schema: str, matrix: np.ndarray, history: list[str] | None = None,
             history_weights: list[float] | None = None) -> ServedFeatures:
        values = base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")
        return cls(schema=schema, values=values, history=history or [],
                   history_weights=history_weights or [])


class RankedResult(_Event, kw_only=True, tag="ranked_result"):
    """What the scorer answered to a query: the impression the shopper was shown.

    ``error`` is set (and ``products`` empty) when the query could not be ranked; the reason is
    never dropped silently. ``timestamp`` is the search's own (event time: when the shopper was
    shown the list); ``latency_ms`` how long the answer took after the query was published.
    """

    query_id: Id
    user_id: Id
    session_id: Id
    model_version: Label
    products: list[RankedProduct]
    text: Text | None = None  # the query, echoed: a labeled list needs it to train the query encoder
    features: ServedFeatures | None = None
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


# --- labels joined from what was served -------------------------------------------------------

Grade = Annotated[int, Meta(ge=0, le=3)]
GRADES: Final = {"shown": 0, "click": 1, "add_to_cart": 2, "purchase": 3}


class LabeledProduct(Struct, kw_only=True, frozen=True):
    """A served product and the strongest thing the shopper did with it (``GRADES``)."""

    product_id: Id
    position: Position
    score: float
    grade: Grade = 0


class LabeledList(_Event, kw_only=True, tag="labeled_list"):
    """A ranked result joined with the clicks, add-to-carts and purchases that followed it.

    Emitted by the joiner once the list's attribution window closes (``revision`` 1); a purchase
    that arrives later, inside the longer purchase window, emits the same ``list_id`` again with
    a higher ``revision`` (the newest revision of a list is the truth). ``features`` are the
    values as served, in ``products`` order.
    """

    list_id: Id
    revision: Annotated[int, Meta(ge=1)] = 1
    query_id: Id
    user_id: Id
    session_id: Id
    text: Text
    model_version: Label
    products: list[LabeledProduct]
    features: ServedFeatures | None = None
    served_at: Timestamp
    timestamp: Timestamp  # event time at which the window closed (or the correction arrived)


Event = (Query | RankedResult | Click | AddToCart | Purchase | CatalogProduct | ModelUpdate
         | LabeledList)

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
LABELED: Final = Codec[LabeledList](LabeledList)
ANY: Final = Codec[Event](Event)
