"""The join of served lists with what shoppers did next: pure rules in event time, no I/O.

A ranked result is an impression: the products a shopper was shown, with the features served.
The clicks, add-to-carts and purchases that follow it are its labels. An interaction finds its
list by ``query_id``, or, when the frontend sent none, by (shopper, product): the most recent list
of that shopper, served inside the attribution window before it, that showed the product.

Windows are in event time. A list closes once the partition's watermark passes ``served_at +
click_window_s``: it is emitted then (revision 1), graded purchase > add-to-cart > click >
shown. It stays open until ``served_at + purchase_window_s``: a purchase in between raises its
grade and emits the list again (revision 2, 3, ...), at once. Interactions that arrive before
their result (the two are on different topics) wait in a placeholder until it comes or until
the watermark passes their own time plus the click window.

:class:`JoinTask` applies one batch of one partition on top of the lists the caller loaded for
it (streams.joiner keeps them in Redis) and says what changed, what to emit and what it counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from core.events import (
    GRADES,
    AddToCart,
    Click,
    Interaction,
    LabeledList,
    LabeledProduct,
    Purchase,
    RankedResult,
    ServedFeatures,
)
from core.settings import JoinerSettings

GRADE_OF: dict[type, int] = {Click: GRADES["click"], AddToCart: GRADES["add_to_cart"],
                             Purchase: GRADES["purchase"]}
PURCHASE = GRADES["purchase"]
ORPHAN_GRACE_MS = 60_000  # how far results read must be past a waiting click (broker time)

_result_decoder = msgspec.json.Decoder(RankedResult)


class OpenList(msgspec.Struct, array_like=True):
    """A list the joiner still holds: its served result, the grades so far, what was emitted."""

    query_id: str
    user_id: str
    served_at: float | None = None  # None: a placeholder, interactions came before their result
    result: bytes | None = None  # the RankedResult as it arrived (contract JSON)
    grades: dict[str, int] = {}
    revision: int = 0  # revisions emitted so far
    pending: list[tuple[int, str, float, int]] = []  # (grade, product, time, counted click) waiting
    first_t: float = 0.0  # the first waiting interaction's time: a placeholder expires from it
    seen_ms: int = 0  # the broker time (ms) of the last waiting interaction's record

    def deadline(self, cfg: JoinerSettings) -> float:
        """When (event time) this list next needs the joiner: emission, then forgetting."""
        if self.served_at is None:
            return self.first_t + cfg.click_window_s
        if self.revision == 0:
            return self.served_at + cfg.click_window_s
        return self.served_at + cfg.purchase_window_s


@dataclass
class JoinCounts:
    """What a batch did, for the metrics and the coverage figure (clicks only count as clicks)."""

    clicks: int = 0  # click events seen
    matched: int = 0  # ... that found their list, the product in it
    off_list: int = 0  # ... that found their list, the product not in it
    unmatched: int = 0  # ... that found no list (none served, or it had been forgotten)
    late: int = 0  # interactions outside their list's window (not counted as labels)
    lists: int = 0  # first revisions emitted
    corrections: int = 0  # later revisions emitted
    no_text: int = 0  # lists that could not be emitted: their result carried no query text

    def add(self, other: JoinCounts) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class JoinTask:
    """One partition's join over one batch. ``lists``: every list the batch may touch, by query id
    (the caller loads them); ``user_lists``: per shopper, the query ids of their lists with a
    result and when each was served (for interactions without a query id)."""

    cfg: JoinerSettings
    lists: dict[str, OpenList]
    user_lists: dict[str, dict[str, float]]
    changed: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    emitted: list[LabeledList] = field(default_factory=list)
    counts: JoinCounts = field(default_factory=JoinCounts)
    indexed: dict[str, dict[str, float]] = field(default_factory=dict)  # new (user -> qid -> served)
    unindexed: dict[str, set[str]] = field(default_factory=dict)  # removed (user -> qids)
    _results: dict[str, RankedResult] = field(default_factory=dict)
    _shown: dict[str, set[str]] = field(default_factory=dict)

    # --- events -------------------------------------------------------------------------------

    def result(self, ev: RankedResult, raw: bytes) -> None:
        """A served list. The first result of a query id wins (a re-ranked redelivery is ignored);
        an error result, or one that showed nothing, has nothing to label."""
        if ev.error is not None or not ev.products:
            return
        held = self.lists.get(ev.query_id)
        if held is not None and held.result is not None:
            return
        served_at = ev.timestamp.timestamp()
        lst = OpenList(query_id=ev.query_id, user_id=ev.user_id, served_at=served_at, result=raw)
        self._results[ev.query_id] = ev
        self.lists[ev.query_id] = lst
        self._touch(lst)
        self.indexed.setdefault(ev.user_id, {})[ev.query_id] = served_at
        self.user_lists.setdefault(ev.user_id, {})[ev.query_id] = served_at
        if held is not None:  # interactions were waiting for it
            for grade, product, t, counted in held.pending:
                self._label(lst, grade, product, t, counted_click=bool(counted))

    def interaction(self, ev: Interaction, record_ms: int = 0) -> None:
        """``record_ms``: when the broker got it (the record's timestamp, wall clock)."""
        grade = GRADE_OF[type(ev)]
        t = ev.timestamp.timestamp()
        is_click = type(ev) is Click
        if is_click:
            self.counts.clicks += 1
        qid = ev.query_id or self._attribute(ev.user_id, ev.product_id, t, grade)
        if qid is None:
            if is_click:
                self.counts.unmatched += 1
            return
        lst = self.lists.get(qid)
        if lst is None:  # its result has not been read yet: wait for it
            lst = OpenList(query_id=qid, user_id=ev.user_id, first_t=t)
            self.lists[qid] = lst
        if lst.result is None:
            lst.pending.append((grade, ev.product_id, t, int(is_click)))
            lst.first_t = min(lst.first_t, t)
            lst.seen_ms = max(lst.seen_ms, record_ms)
            self._touch(lst)
            return
        self._label(lst, grade, ev.product_id, t, counted_click=is_click)

    def advance(self, watermark: float, due: Iterable[str], results_read_ms: float = math.inf) -> None:
        """Close what the watermark has passed, among ``due`` (query ids whose stored deadline is
        at or before it) and the lists this batch touched.

        Interactions still waiting for their result give up only once the results read are
        newer *on the broker* than they are (``results_read_ms``): a result reaches the broker
        before the clicks on it, whatever event times say, so a result still unread is never
        given up on."""
        for qid in sorted(set(due) | self.changed):
            lst = self.lists.get(qid)
            if lst is None or qid in self.deleted:
                continue
            while lst.deadline(self.cfg) <= watermark and qid not in self.deleted:
                if lst.served_at is None:  # no result came for these interactions
                    if results_read_ms < lst.seen_ms + ORPHAN_GRACE_MS:
                        break  # it may still be on its way: due again next time
                    self.counts.unmatched += sum(counted for *_, counted in lst.pending)
                    self._forget(lst)
                elif lst.revision == 0:
                    self._emit(lst, lst.served_at + self.cfg.click_window_s)
                else:
                    self._forget(lst)

    # --- rules --------------------------------------------------------------------------------

    def _attribute(self, user_id: str, product_id: str, t: float, grade: int) -> str | None:
        """The shopper's latest list served before ``t``, inside the window, showing the product."""
        window = self.cfg.purchase_window_s if grade == PURCHASE else self.cfg.click_window_s
        candidates = sorted(self.user_lists.get(user_id, {}).items(), key=lambda kv: -kv[1])
        for qid, served_at in candidates:
            if served_at <= t <= served_at + window and qid in self.lists \
                    and product_id in self._products(self.lists[qid]):
                return qid
        return None

    def _label(self, lst: OpenList, grade: int, product_id: str, t: float, counted_click: bool) -> None:
        assert lst.served_at is not None
        shown = product_id in self._products(lst)
        if counted_click:
            if shown:
                self.counts.matched += 1
            else:
                self.counts.off_list += 1
        if not shown:
            return
        window = self.cfg.purchase_window_s if grade == PURCHASE else self.cfg.click_window_s
        if (lst.revision > 0 and grade != PURCHASE) or t > lst.served_at + window:
            self.counts.late += 1
            return
        if grade <= lst.grades.get(product_id, 0):
            return
        lst.grades[product_id] = grade
        self._touch(lst)
        if lst.revision > 0:  # a purchase after the list was emitted: a correction, now
            self._emit(lst, t)

    def _emit(self, lst: OpenList, at: float) -> None:
        ev = self._result(lst)
        lst.revision += 1
        self._touch(lst)
        if ev.text is None:
            self.counts.no_text += 1
            return
        # The first max_list_len positions and every product acted on further down: what training
        # and the position figures read (a whole 1,000-product impression would be mostly padding).
        limit = self.cfg.max_list_len or len(ev.products)
        keep = [i for i, p in enumerate(ev.products)
                if p.position <= limit or lst.grades.get(p.product_id, 0) > 0]
        products = [LabeledProduct(product_id=p.product_id, position=p.position, score=p.score,
                                   grade=lst.grades.get(p.product_id, 0))
                    for p in (ev.products[i] for i in keep)]
        features = ev.features
        if features is not None and len(keep) < len(ev.products):
            features = ServedFeatures.pack(features.schema, features.matrix(len(ev.products))[keep],
                                           features.history, features.history_weights)
        self.emitted.append(LabeledList(
            list_id=lst.query_id, revision=lst.revision, query_id=lst.query_id, user_id=ev.user_id,
            session_id=ev.session_id, text=ev.text, model_version=ev.model_version, products=products,
            features=features, served_at=ev.timestamp, timestamp=datetime.fromtimestamp(at, UTC)))
        if lst.revision == 1:
            self.counts.lists += 1
        else:
            self.counts.corrections += 1

    def _forget(self, lst: OpenList) -> None:
        self.deleted.add(lst.query_id)
        self.changed.discard(lst.query_id)
        if lst.served_at is not None:
            self.unindexed.setdefault(lst.user_id, set()).add(lst.query_id)
            self.user_lists.get(lst.user_id, {}).pop(lst.query_id, None)

    def _touch(self, lst: OpenList) -> None:
        self.changed.add(lst.query_id)
        self.deleted.discard(lst.query_id)

    def _result(self, lst: OpenList) -> RankedResult:
        ev = self._results.get(lst.query_id)
        if ev is None:
            assert lst.result is not None
            ev = self._results[lst.query_id] = _result_decoder.decode(lst.result)
        return ev

    def _products(self, lst: OpenList) -> set[str]:
        shown = self._shown.get(lst.query_id)
        if shown is None:
            shown = self._shown[lst.query_id] = {p.product_id for p in self._result(lst).products}
        return shown


def coverage(counts: dict[str, int] | Counter[str]) -> float:
    """The share of clicks that found the list they were shown in (1.0 before any click)."""
    clicks = counts.get("clicks", 0)
    return (counts.get("matched", 0) + counts.get("off_list", 0)) / clicks if clicks else 1.0
