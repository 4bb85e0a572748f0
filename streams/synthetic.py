"""Deterministic synthetic shop traffic (catalog, searches, impressions, clicks, carts, purchases)
for tests and the benchmark: realistic shape, any size, the same events for the same seed."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.events import (
    AddToCart,
    CatalogProduct,
    Click,
    Event,
    Purchase,
    Query,
    QueryContext,
    RankedProduct,
    RankedResult,
)

WORDS = ("tv", "laptop", "phone", "case", "cable", "headphones", "camera", "speaker", "monitor",
         "mouse", "keyboard", "charger", "tablet", "router", "printer", "game")
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Shape:
    users: int = 200
    products: int = 300
    categories: int = 20
    brands: int = 15
    shown: int = 10  # products per ranked result
    seed: int = 7


def catalog(shape: Shape) -> list[CatalogProduct]:
    rnd = random.Random(shape.seed)
    out = []
    for i in range(shape.products):
        cat = f"cat{i % shape.categories}"
        out.append(CatalogProduct(
            product_id=f"p{i}",
            title=f"{WORDS[i % len(WORDS)]} model {i}",
            brand=f"Brand{rnd.randrange(shape.brands)}",
            category_path=["root", f"dept{i % 4}", cat],
            price=round(rnd.uniform(5, 500) * (1 + i % shape.categories / 5), 2),
            updated_at=START - timedelta(days=rnd.randrange(1, 400)),
        ))
    return out


def sessions(shape: Shape, n_queries: int, start: datetime = START, tag: str = "") -> Iterator[Event]:
    """Per search: the Query, its RankedResult, then clicks / add-to-carts / purchases, in time order.
    Shoppers follow a skewed activity distribution; each has favourite categories."""
    rnd = random.Random(shape.seed + 1)
    everyone = list(range(shape.users))
    rnd.shuffle(everyone)  # 70% of searches go round a shuffled list: everyone shows up
    t, turn = start, 0
    for q in range(n_queries):
        t += timedelta(milliseconds=rnd.randrange(1, 2000))
        if rnd.random() < 0.3:
            uid = f"u{min(int(rnd.paretovariate(1.2)) - 1, shape.users - 1)}"
        else:
            uid, turn = f"u{everyone[turn % shape.users]}", turn + 1
        qid, sid = f"q{tag}{shape.seed}-{q}", f"s{uid}-{q // 5}"
        favourite = zlib.crc32(uid.encode()) % shape.categories
        text = f"{WORDS[(favourite + rnd.randrange(3)) % len(WORDS)]} {rnd.choice(WORDS)}"
        per_cat = shape.products // shape.categories
        shown = [f"p{(favourite + shape.categories * rnd.randrange(per_cat)) % shape.products}"
                 if rnd.random() < 0.6 else f"p{rnd.randrange(shape.products)}" for _ in range(shape.shown)]
        ctx = QueryContext(location=rnd.choice(["US-CA", "US-NY", "US-TX", None]),
                          device=rnd.choice(["mobile", "desktop"]))
        yield Query(query_id=qid, user_id=uid, session_id=sid, text=text, context=ctx, timestamp=t)
        t += timedelta(milliseconds=rnd.randrange(5, 50))
        yield RankedResult(
            query_id=qid, user_id=uid, session_id=sid, model_version="v0", text=text,
            products=[RankedProduct(product_id=p, score=1.0 / (i + 1), position=i + 1)
                      for i, p in enumerate(shown)],
            timestamp=t,
        )
        for pos, pid in enumerate(shown, start=1):
            if rnd.random() > 0.25 / pos:
                continue
            t += timedelta(milliseconds=rnd.randrange(100, 5000))
            common = dict(user_id=uid, session_id=sid, product_id=pid, query_id=qid, position=pos)
            yield Click(event_id=f"{qid}-c{pos}", timestamp=t, **common)
            if rnd.random() < 0.3:
                t += timedelta(milliseconds=rnd.randrange(100, 5000))
                yield AddToCart(event_id=f"{qid}-a{pos}", timestamp=t, **common)
                if rnd.random() < 0.5:
                    t += timedelta(milliseconds=rnd.randrange(100, 5000))
                    yield Purchase(event_id=f"{qid}-b{pos}", order_id=f"o{qid}", timestamp=t,
                                   price=round(rnd.uniform(5, 800), 2), **common)
