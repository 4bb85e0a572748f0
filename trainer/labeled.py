"""Labeled lists from the labeled topic, held compactly, and turned into training examples.

The joiner publishes each served list once its attribution window closes (revision 1) and again
when a late purchase corrects it (a higher revision): :class:`LabeledPool` keeps the newest
revision of each ``list_id``. It reads the topic by assignment (no consumer group: the offsets it
has read up to are recorded in each model version's manifest instead) up to the high watermarks
of the moment, and keeps memory bounded: the newest ``keep_recent`` lists by ``served_at``, and a
uniform reservoir sample of the older lists someone acted on (the "older sample" a cycle mixes
in). A list is held as arrays, cut to its first ``max_list_len`` positions plus every product
acted on further down; the served feature values are kept only for lists with an action (a list
without one teaches a listwise loss nothing, but still counts for position bias and click MRR).

:func:`to_examples` turns lists into :class:`trainer.fit.Examples` on a product embedding table:
the features exactly as served (no train/serve skew), the grades as the joiner gave them (the
loss's gain is 2^grade - 1: purchase > add-to-cart > click > shown).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from core import kafka
from core.events import LABELED, InvalidEvent, LabeledList
from core.settings import Settings
from trainer.examples import history
from trainer.fit import Examples

log = structlog.get_logger(__name__)


class TopicMissing(RuntimeError):
    """The labeled topic does not exist (yet)."""


@dataclass
class ServedList:
    """One labeled list, compact. Rows are in served order (position 1 first)."""

    list_id: str
    revision: int
    text: str
    user_id: str
    model_version: str
    served_at: datetime
    positions: np.ndarray  # [N] int32, 1-based served positions
    grades: np.ndarray  # [N] int8 (events.GRADES)
    product_ids: list[str] | None = None  # kept when some product was acted on
    schema: str | None = None  # the served features' schema (None: no features served)
    features: np.ndarray | None = None  # [N, F] float32, when acted on and served
    history: list[str] = field(default_factory=list)
    history_weights: list[float] = field(default_factory=list)
    offset: tuple[int, int] = (0, 0)  # (partition, offset) it was read from
    problem: str | None = None  # why its features are unusable (e.g. size mismatch)

    @property
    def acted_on(self) -> bool:
        return bool((self.grades > 0).any())

    def first_click(self) -> int | None:
        """Position of the first product acted on (grade >= 1), None when none was."""
        hit = np.flatnonzero(self.grades > 0)
        return int(self.positions[hit].min()) if len(hit) else None


def compact(event: LabeledList, max_list_len: int, where: tuple[int, int] = (0, 0)) -> ServedList:
    """The list as arrays, in position order, cut to ``max_list_len`` positions plus every product
    acted on below them."""
    order = sorted(range(len(event.products)), key=lambda i: event.products[i].position)
    products = [event.products[i] for i in order]
    keep = [i for i, p in enumerate(products) if i < max_list_len or p.grade > 0]
    grades = np.array([products[i].grade for i in keep], dtype=np.int8)
    out = ServedList(
        list_id=event.list_id, revision=event.revision, text=event.text, user_id=event.user_id,
        model_version=event.model_version, served_at=event.served_at,
        positions=np.array([products[i].position for i in keep], dtype=np.int32), grades=grades,
        offset=where)
    if not (grades > 0).any():
        return out
    out.product_ids = [products[i].product_id for i in keep]
    if event.features is not None:
        out.schema = event.features.schema
        out.history = list(event.features.history)
        out.history_weights = list(event.features.history_weights)
        try:
            matrix = event.features.matrix(len(event.products))
            out.features = np.ascontiguousarray(matrix[np.asarray(order)[keep]], dtype=np.float32)
        except ValueError as exc:  # the values do not fit the products: the list is not usable
            out.problem = str(exc)
    return out


class LabeledPool:
    """The labeled lists read so far (newest revision of each), bounded; see the module docstring."""

    def __init__(self, settings: Settings, keep_recent: int | None = None, keep_older: int | None = None,
                 seed: int = 0) -> None:
        t = settings.trainer
        self._settings = settings
        self.topic = settings.topics.labeled
        self.max_list_len = t.max_list_len
        self.keep_recent = keep_recent or 2 * (t.fresh_lists + t.holdout_lists)
        self.keep_older = keep_older if keep_older is not None else 2 * t.older_sample
        self.recent: dict[str, ServedList] = {}
        self.older: list[ServedList] = []  # reservoir of older acted-on lists
        self._older_index: dict[str, int] = {}
        self._older_seen = 0  # acted-on lists that ever fell out of the recent window
        self._rng = np.random.default_rng(seed)
        self.offsets: dict[int, int] = {}  # partition -> next offset to read
        self.records = 0
        self.invalid = 0
        self.superseded = 0  # records older than (or equal to) a revision already held
        self.corrections = 0  # records that replaced an earlier revision
        self._consumer = None

    # --- reading --------------------------------------------------------------------------------

    def read(self, timeout_s: float = 60.0) -> int:
        """Read every record up to the high watermarks as they are now; returns records read."""
        if self._consumer is None:
            self._consumer = kafka.consumer(self._settings, group_id=self._settings.trainer.group_id)
        consumer = self._consumer
        try:
            marks = kafka.watermarks(consumer, [self.topic], timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise TopicMissing(f"the labeled topic {self.topic} does not exist: run `shoprank topics` "
                                   f"(and the joiner, which fills it)") from None
            raise
        ends = {p: high for (_, p), (_, high) in marks.items() if high > self.offsets.get(p, 0)}
        if not ends:
            return 0
        consumer.assign([TopicPartition(self.topic, p, self.offsets.get(p, OFFSET_BEGINNING)) for p in ends])
        remaining = {(self.topic, p): high for p, high in ends.items()}
        read = 0
        idle_since = None
        while remaining:
            messages = consumer.consume(2000, 0.5)
            if not messages:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > timeout_s:
                    raise TimeoutError(f"{self.topic}: no records for {timeout_s:.0f} s before the "
                                       f"high watermarks {remaining}")
            else:
                idle_since = None
            for msg in messages:
                if msg.error() is not None:
                    log.warning("labeled_read_error", topic=self.topic, reason=str(msg.error()))
                    continue
                self._take(msg.partition(), msg.offset(), msg.value())
                self.offsets[msg.partition()] = msg.offset() + 1
                read += 1
            kafka.drop_reached(consumer, remaining)
        for tp in consumer.position([TopicPartition(self.topic, p) for p in ends]):
            if tp.offset >= 0:  # compaction or transactions can leave gaps: the position is the truth
                self.offsets[tp.partition] = max(self.offsets.get(tp.partition, 0), tp.offset)
        self.records += read
        self._bound()
        return read

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _take(self, partition: int, offset: int, value: bytes | None) -> None:
        try:
            event = LABELED.decode(value or b"")
        except InvalidEvent as exc:
            # The labeled topic keeps everything: the record stays there; it is counted and logged.
            self.invalid += 1
            log.warning("labeled_list_invalid", topic=self.topic, partition=partition, offset=offset,
                        reason=exc.reason)
            return
        held = self.recent.get(event.list_id)
        if held is None and event.list_id in self._older_index:
            held = self.older[self._older_index[event.list_id]]
        if held is not None and held.revision >= event.revision:
            self.superseded += 1
            return
        item = compact(event, self.max_list_len, (partition, offset))
        if held is not None:
            self.corrections += 1
            if event.list_id in self._older_index:
                self.older[self._older_index[event.list_id]] = item
                return
        self.recent[event.list_id] = item

    def _bound(self) -> None:
        """Keep the newest ``keep_recent`` lists; offer the acted-on rest to the reservoir."""
        if len(self.recent) <= self.keep_recent:
            return
        by_time = sorted(self.recent.values(), key=lambda s: s.served_at)
        for item in by_time[: len(by_time) - self.keep_recent]:
            del self.recent[item.list_id]
            if item.features is None:
                continue
            self._older_seen += 1
            if len(self.older) < self.keep_older:
                self._older_index[item.list_id] = len(self.older)
                self.older.append(item)
            else:  # Algorithm R: each older list ends up held with equal probability
                j = int(self._rng.integers(self._older_seen))
                if j < self.keep_older:
                    del self._older_index[self.older[j].list_id]
                    self.older[j] = item
                    self._older_index[item.list_id] = j

    # --- views ----------------------------------------------------------------------------------

    def all_lists(self) -> list[ServedList]:
        return [*self.recent.values(), *self.older]

    def new_since(self, offsets: Mapping[int, int]) -> int:
        """Records read beyond ``offsets`` (partition -> next offset), e.g. the last cycle's."""
        return sum(max(0, end - offsets.get(p, 0)) for p, end in self.offsets.items())


# --- measurements ------------------------------------------------------------------------------


def click_mrr(lists: Sequence[ServedList]) -> float:
    """Mean reciprocal served position of the first product acted on; a list without one counts 0."""
    if not lists:
        return 0.0
    return float(np.mean([1.0 / p if (p := s.first_click()) else 0.0 for s in lists]))


@dataclass(frozen=True)
class PositionBias:
    """Clicks by served position: the click-through rate at each position, and the propensity
    (chance of being looked at) it implies relative to position 1, made non-increasing.

    This is the naive estimate: it confounds examination with relevance (the ranker puts the
    best products first), so it overstates the bias; inverse-propensity weights from it are
    clipped and kept only when they help on the holdout.
    """

    ctr: list[float]  # position k+1
    impressions: list[int]
    propensity: list[float]
    lists: int
    clicks: int

    def to_dict(self) -> dict:
        return {"ctr": [round(x, 5) for x in self.ctr], "impressions": self.impressions,
                "propensity": [round(x, 5) for x in self.propensity], "lists": self.lists,
                "clicks": self.clicks}

    def weights(self, positions: np.ndarray, clip: float) -> np.ndarray:
        """1 / propensity of each position (positions past the measured ones take the last), at
        most ``clip``."""
        if not self.propensity:
            return np.ones(positions.shape, np.float32)
        p = np.asarray(self.propensity, dtype=np.float64)
        idx = np.clip(positions - 1, 0, len(p) - 1)
        return np.minimum(1.0 / np.maximum(p[idx], 1e-9), clip).astype(np.float32)


def position_bias(lists: Sequence[ServedList], max_position: int = 20, min_impressions: int = 20
                  ) -> PositionBias:
    """Measure :class:`PositionBias` over ``lists`` (positions 1..max_position; a position seen
    fewer than ``min_impressions`` times takes the propensity of the position above it)."""
    shown = np.zeros(max_position, np.int64)
    clicked = np.zeros(max_position, np.int64)
    for s in lists:
        pos = s.positions[(s.positions >= 1) & (s.positions <= max_position)] - 1
        np.add.at(shown, pos, 1)
        hit = s.positions[(s.grades > 0) & (s.positions <= max_position)] - 1
        np.add.at(clicked, hit, 1)
    ctr = np.divide(clicked, shown, out=np.zeros(max_position), where=shown > 0)
    propensity: list[float] = []
    if shown[0] >= min_impressions and ctr[0] > 0:
        last = 1.0
        for k in range(max_position):
            if shown[k] >= min_impressions:
                last = min(last, max(ctr[k] / ctr[0], 0.0))
            propensity.append(last)
    return PositionBias(ctr=ctr.tolist(), impressions=shown.tolist(), propensity=propensity,
                        lists=len(lists), clicks=int(clicked.sum()))


# --- examples ----------------------------------------------------------------------------------


def usable(lists: Sequence[ServedList], schema: str) -> tuple[list[ServedList], dict[str, int]]:
    """The acted-on lists whose served features are in ``schema``; the others counted by reason."""
    out: list[ServedList] = []
    skipped = {"not_acted_on": 0, "no_features": 0, "other_schema": 0, "bad_features": 0}
    for s in lists:
        if not s.acted_on:
            skipped["not_acted_on"] += 1
        elif s.problem is not None:
            skipped["bad_features"] += 1
        elif s.features is None:
            skipped["no_features"] += 1
        elif s.schema != schema:
            skipped["other_schema"] += 1
        else:
            out.append(s)
    return out, skipped


def to_examples(lists: Sequence[ServedList], index: Mapping[str, int], unknown_row: int,
                history_len: int, n_features: int, bias: PositionBias | None = None,
                clip: float = 10.0) -> Examples:
    """Examples over an embedding table (``index``: product id -> row; unknown products take
    ``unknown_row``, the table's zero row). With ``bias``, each acted-on product's gain is
    weighted by the inverse propensity of the position it was served at."""
    width = max((len(s.positions) for s in lists), default=1)
    n = len(lists)
    texts: dict[str, int] = {}
    text_id = np.zeros(n, np.int64)
    cand_idx = np.full((n, width), unknown_row, np.int64)
    grades = np.zeros((n, width), np.int64)
    dense = np.zeros((n, width, n_features), np.float32)
    hist_idx = np.full((n, history_len), unknown_row, np.int64)
    hist_w = np.zeros((n, history_len), np.float32)
    valid = np.zeros((n, width), bool)
    for i, s in enumerate(lists):
        if s.features is None or s.product_ids is None:
            raise ValueError(f"list {s.list_id} has no served features")
        k = len(s.product_ids)
        text_id[i] = texts.setdefault(s.text, len(texts))
        cand_idx[i, :k] = [index.get(p, unknown_row) for p in s.product_ids]
        grades[i, :k] = s.grades
        dense[i, :k] = s.features
        valid[i, :k] = True
        if s.history:
            hist_idx[i], hist_w[i] = history(s.history, np.asarray(s.history_weights, np.float32),
                                             index, unknown_row, history_len)  # type: ignore[arg-type]
    weight = None if bias is None else ipw_weights(lists, width, bias, clip)
    return Examples(list(texts), text_id, cand_idx, grades, dense, hist_idx, hist_w, valid, weight)


def ipw_weights(lists: Sequence[ServedList], width: int, bias: PositionBias, clip: float) -> np.ndarray:
    """[lists, width] gain weights: the inverse propensity of each acted-on product's served
    position (examination is what position biases, whatever the shopper did next), 1 elsewhere."""
    weight = np.ones((len(lists), width), np.float32)
    for i, s in enumerate(lists):
        weight[i, : len(s.positions)] = np.where(s.grades > 0, bias.weights(s.positions, clip), 1.0)
    return weight
