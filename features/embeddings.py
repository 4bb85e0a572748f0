"""Product embeddings in Redis, per product tower: where every scorer reads products published
after its version was trained.

Layout (:mod:`features.keys`): ``pe:{tower}`` is a hash product id -> value, ``pef:{tower}`` a
stream of the product ids whose vector changed (the change feed). A value is a 32-byte ASCII
header, the product's ``updated_at`` in epoch milliseconds (16 hex digits) and a digest of the
text that was embedded (16 hex digits), then the float32 little-endian vector.

Writes are idempotent and ordered by ``updated_at``, like the catalog features: an older
version of a product (a replay, a redelivery) never replaces a newer one; the same text keeps
its vector byte for byte (only the header's time moves, and the feed is not told); an edited
text replaces the vector and appends the product id to the feed. All of it in one script per
batch, so scorers never see a vector without its feed entry following.

Readers (the scorer) load the whole hash once, then follow the feed: :meth:`ProductEmbeddings.load`
notes the feed's position *before* scanning, so a vector written during the scan is read again
from the feed, never missed. The feed is trimmed near :data:`FEED_MAXLEN` entries; a reader that
fell behind the trim is told to reload (:class:`FeedGap`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import redis

from features import keys

HEADER: Final = 32
#: The change feed keeps about this many entries: a scorer more than that many changes behind
#: (down for a while) reloads the whole hash instead.
FEED_MAXLEN: Final = 100_000
START: Final = "0-0"  # the feed position before any entry
_SCAN_COUNT = 1000
_VECTOR = np.dtype("<f4")

# KEYS: the hash, the feed. ARGV: the feed's max length, then (product id, value) pairs.
# Headers compare as strings: fixed-width lowercase hex sorts as the numbers do.
_WRITE = """
local changed = 0
for i = 2, #ARGV, 2 do
  local pid, new = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[1], pid)
  local new_t, new_d = string.sub(new, 1, 16), string.sub(new, 17, 32)
  if not old then
    redis.call('HSET', KEYS[1], pid, new)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'p', pid)
    changed = changed + 1
  else
    local old_t, old_d = string.sub(old, 1, 16), string.sub(old, 17, 32)
    if new_t >= old_t then
      if new_d == old_d then
        if new_t ~= old_t then
          redis.call('HSET', KEYS[1], pid, new_t .. string.sub(old, 17))
        end
      else
        redis.call('HSET', KEYS[1], pid, new)
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'p', pid)
        changed = changed + 1
      end
    end
  end
end
return changed
"""


def text_digest(text: str) -> str:
    """16 hex digits naming the text a vector was computed from."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def encode_value(updated_at_ms: int, digest: str, vector: np.ndarray) -> bytes:
    return f"{max(0, updated_at_ms):016x}{digest}".encode() + np.ascontiguousarray(vector, _VECTOR).tobytes()


@dataclass(frozen=True)
class Stored:
    """What the hash holds for one product."""

    updated_at_ms: int
    digest: str
    raw: bytes  # the whole value (the vector is raw[HEADER:])

    @classmethod
    def parse(cls, raw: bytes) -> Stored:
        return cls(int(raw[:16], 16), raw[16:HEADER].decode(), raw)

    @property
    def vector(self) -> np.ndarray:
        return np.frombuffer(self.raw, _VECTOR, offset=HEADER)


class FeedGap(RuntimeError):
    """The feed was trimmed past the reader's cursor: changes may be missed, reload the hash."""


@dataclass(frozen=True)
class Cursor:
    """A reader's place in the feed: the last entry id read and how many entries the feed had
    received up to it. Trimming drops the oldest entries first, so entries after the cursor are
    all still there as long as fewer than ``seen`` were ever trimmed (Redis 7 counts both)."""

    entry_id: str = START
    seen: int = 0


@dataclass(frozen=True)
class Rows:
    """Product ids and their vectors [len(ids), D] (D = 0 when there are none)."""

    ids: list[str]
    vectors: np.ndarray
    cursor: Cursor  # the feed position these rows are current to


def _vectors(raws: Sequence[bytes]) -> np.ndarray:
    if not raws:
        return np.zeros((0, 0), np.float32)
    return np.vstack([np.frombuffer(r, _VECTOR, offset=HEADER) for r in raws])


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ProductEmbeddings:
    """One product tower's embeddings in Redis: written by the embedder, read by scorers."""

    def __init__(self, client: redis.Redis, tower: str, feed_maxlen: int = FEED_MAXLEN) -> None:
        self.client = client
        self.tower = tower
        self.key = keys.product_embeddings(tower)
        self.feed = keys.product_embedding_feed(tower)
        self.feed_maxlen = feed_maxlen
        self._write = client.register_script(_WRITE)

    # --- the embedder's side ----------------------------------------------------------------

    def stored(self, product_ids: Sequence[str]) -> list[Stored | None]:
        """What is stored now for each product (None: nothing)."""
        if not product_ids:
            return []
        raws = self.client.hmget(self.key, list(product_ids))
        return [Stored.parse(r) if r else None for r in raws]

    def write(self, values: Iterable[tuple[str, bytes]]) -> int:
        """Store ``(product id, encode_value(...))`` pairs (see the module doc for what wins);
        returns how many vectors changed (each one a feed entry)."""
        args: list[str | bytes | int] = [self.feed_maxlen]
        for pid, value in values:
            args += [pid, value]
        if len(args) == 1:
            return 0
        return int(self._write(keys=[self.key, self.feed], args=args))

    # --- the scorer's side ------------------------------------------------------------------

    def count(self) -> int:
        return int(self.client.hlen(self.key))

    def _feed_info(self) -> dict[str, Any] | None:
        try:
            return self.client.xinfo_stream(self.feed)
        except redis.ResponseError:  # no such key: nothing written for this tower yet
            return None

    def load(self) -> Rows:
        """Every stored vector, and the feed cursor to follow changes from (taken before the
        scan: a vector written during it is read again from the feed, never missed)."""
        info = self._feed_info()
        cursor = Cursor()
        if info is not None:
            cursor = Cursor(_s(info["last-generated-id"]), int(info["entries-added"]))
        ids: list[str] = []
        raws: list[bytes] = []
        for pid, raw in self.client.hscan_iter(self.key, count=_SCAN_COUNT):
            ids.append(_s(pid))
            raws.append(raw)
        return Rows(ids, _vectors(raws), cursor)

    def changes(self, cursor: Cursor, limit: int = 10_000) -> Rows:
        """The vectors changed since ``cursor`` (each product once, as stored now) and the new
        cursor; :class:`FeedGap` when entries after ``cursor`` were trimmed before being read."""
        pipe = self.client.pipeline(transaction=True)  # the count and the entries agree
        pipe.xinfo_stream(self.feed)
        pipe.xread({self.feed: cursor.entry_id}, count=limit)
        info, read = pipe.execute(raise_on_error=False)
        if isinstance(info, Exception):  # no feed yet
            return Rows([], np.zeros((0, 0), np.float32), cursor)
        if isinstance(read, Exception):
            raise read
        trimmed = int(info["entries-added"]) - int(info["length"])
        if trimmed > cursor.seen:
            raise FeedGap(f"{self.feed}: {trimmed} entries trimmed, this reader had seen {cursor.seen}")
        ids: dict[str, None] = {}
        entry_id, seen = cursor.entry_id, cursor.seen
        for _stream, entries in read or []:
            for eid, fields in entries:
                entry_id, seen = _s(eid), seen + 1
                pid = fields.get(b"p") or fields.get("p")
                if pid is not None:
                    ids[_s(pid)] = None
        after = Cursor(entry_id, seen)
        if not ids:
            return Rows([], np.zeros((0, 0), np.float32), after)
        wanted = list(ids)
        raws = self.client.hmget(self.key, wanted)
        kept = [(p, r) for p, r in zip(wanted, raws, strict=True) if r]
        return Rows([p for p, _ in kept], _vectors([r for _, r in kept]), after)
