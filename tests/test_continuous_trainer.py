"""The continuous trainer against the real broker and Redis: a cycle over labeled lists published
to the labeled topic, the gate, rollback (CLI and guardrail), the lease, and scorers resolving
announced versions under their own registry setting.

Labeled lists are made from Best Buy searches the tiny serving version never trained on: their
features read point-in-time through the same path the scorer uses, ranked by that version (the
positions it served), graded by the clicks that really followed.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from msgspec.structs import replace

from core import kafka
from core import registry as reg
from core.events import (
    MODEL_UPDATES,
    LabeledList,
    LabeledProduct,
    ModelUpdate,
    ServedFeatures,
    encode,
)
from core.settings import ModelSettings, Settings, TrainerSettings
from core.text import normalize_query
from features.memory import MemoryStore
from features.read import FEATURE_SCHEMA
from scorer.metrics import ScorerMetrics
from scorer.runtime import encode_texts, encoder_key, load_served_model
from scorer.swap import ModelHolder
from streams.testing import publish, wait_until
from tests.conftest import RedisAt
from tests.model_factory import SLICE, split, tiny_run, tiny_version
from trainer import commands, continuous
from trainer.continuous import ContinuousTrainer, Outcome, run_once
from trainer.examples import ListBuilder, build_lists
from trainer.fit import TextBatcher, predict
from trainer.gate import paired_bootstrap
from trainer.labeled import LabeledPool, compact, position_bias, to_examples
from trainer.lease import Lease, LeaseHeld

LIST_SIZE = 20
N_ROWS = 1200  # Best Buy clicks after the tiny version's training slice: about 1,000 searches


@cache
def served_lists(model_version: str = "v1") -> tuple[LabeledList, ...]:
    """Labeled lists as the joiner would publish them for what the tiny version served."""
    run = tiny_run()
    rows = split().train[SLICE : SLICE + N_ROWS]
    rng = np.random.default_rng(0)
    dim = run.catalog.embeddings.shape[1]
    vectors = {normalize_query(r.query): rng.normal(size=dim).astype(np.float32) for r in rows}
    store = MemoryStore(Settings().features)  # the rules tiny_run trained with
    for product in split().catalog.values():
        store.apply(product)
    builder = ListBuilder(run.catalog, vectors, LIST_SIZE, run.model.cfg.history_len, 0)
    ex, _ = build_lists(rows, store, builder, progress=False)
    scores = predict(run.model, TextBatcher(run.tokenizer, ex.texts, run.model.cfg.max_query_len),
                     torch.from_numpy(run.catalog.table()), ex)
    # The searches in the order build_lists made their lists (time, then first appearance).
    first: dict[str, object] = {}
    for r in rows:
        first.setdefault(r.query_id, r)
    searches = sorted(first.values(), key=lambda r: r.query_time)  # type: ignore[attr-defined]
    ids = run.catalog.product_ids
    out = []
    for i, search in enumerate(searches):
        n = int(ex.valid[i].sum())
        order = np.argsort(-scores[i, :n], kind="stable")
        products = [LabeledProduct(product_id=ids[ex.cand_idx[i, j]], position=k + 1,
                                   score=float(scores[i, j]), grade=int(ex.grades[i, j]))
                    for k, j in enumerate(order)]
        known = [(ids[h], float(w)) for h, w in zip(ex.hist_idx[i], ex.hist_w[i], strict=True)
                 if h < len(ids)]
        features = ServedFeatures.pack(FEATURE_SCHEMA, ex.dense[i, order], [p for p, _ in known],
                                       [w for _, w in known])
        served_at = search.query_time  # type: ignore[attr-defined]
        out.append(LabeledList(list_id=search.query_id, query_id=search.query_id,  # type: ignore[attr-defined]
                               user_id=search.user_id or "anonymous", session_id="s",  # type: ignore[attr-defined]
                               text=ex.texts[ex.text_id[i]], model_version=model_version, products=products,
                               features=features, served_at=served_at,
                               timestamp=served_at + timedelta(minutes=30)))
    return tuple(out)


def purchased(lst: LabeledList) -> LabeledList:
    """The joiner's correction of ``lst``: a late purchase of the product acted on (revision 2)."""
    products = [replace(p, grade=3) if p.grade else p for p in lst.products]
    return replace(lst, revision=2, products=products)


def labeled_records(settings: Settings, lists) -> list[tuple[str, str, bytes]]:  # type: ignore[no-untyped-def]
    return [(settings.topics.labeled, x.user_id, encode(x)) for x in lists]


def trainer_settings(settings: Settings, registry: Path, **trainer: object) -> Settings:
    base = dict(holdout_lists=60, fresh_lists=500, older_sample=100, epochs=1, max_cycle_s=120,
                gate_margin=1.0, bootstrap_samples=200, guardrail_min_lists=20, guardrail_margin=0.05,
                lease_ttl_s=30, poll_s=0.2, min_new_lists=10**6, interval_s=10**6,
                group_id=f"trainer-{uuid.uuid4().hex[:6]}")
    return settings.model_copy(update={
        "model": ModelSettings(registry_dir=registry, batch_size=32),
        "trainer": TrainerSettings(**{**base, **trainer}),  # type: ignore[arg-type]
    })


def model_updates(settings: Settings) -> list[ModelUpdate]:
    """Every announcement on the model-updates topic, read to its end."""
    consumer = kafka.consumer(settings, group_id=f"reader-{uuid.uuid4().hex[:6]}")
    try:
        marks = kafka.watermarks(consumer, [settings.topics.model_updates])
        ends = {tp: high for tp, (_, high) in marks.items()}
        if not ends:
            return []
        consumer.subscribe([settings.topics.model_updates])
        out: list[ModelUpdate] = []
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(MODEL_UPDATES.decode(msg.value()))
                if msg.offset() + 1 >= ends.get((msg.topic(), msg.partition()), 0):
                    ends.pop((msg.topic(), msg.partition()), None)
        return out
    finally:
        consumer.close()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    tiny_version(path, "v1")
    reg.set_serving(path, "v1")
    return path


def once(settings: Settings) -> int:
    return commands.cmd_trainer(argparse.Namespace(once=True, wait=0.0), settings)


# --- a cycle -------------------------------------------------------------------------------------------


def test_a_cycle_over_labeled_lists_publishes_a_gated_version(settings: Settings, registry: Path,
                                                              redis_client, capsys) -> None:
    s = trainer_settings(settings, registry, position_debias="auto")  # both variants tried
    lists = list(served_lists())
    correction = purchased(next(x for x in lists if any(p.grade for p in x.products)))
    other_schema = replace(lists[0], list_id="other-schema", query_id="other-schema",
                           features=ServedFeatures.pack("f3-000000000000", np.ones((LIST_SIZE, 3))))
    records = labeled_records(s, [*lists, correction, other_schema])
    records.append((s.topics.labeled, "u", b'{"type": "labeled_list", "list_id": "broken"}'))
    publish(s, records)

    started = time.monotonic()
    assert once(s) == Outcome.PROMOTED
    seconds = time.monotonic() - started
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("promoted ") and "gate passed" in printed

    new = reg.serving_version(registry)
    assert new is not None and new != "v1"
    version = reg.load_version(registry, new)
    m = version.manifest
    assert m["parent_version"] == "v1" and m["trained_by"] == "continuous"
    acted_on = [x for x in lists if any(p.grade for p in x.products)]
    rest = len(acted_on) - 60
    train = min(500, rest) + min(100, max(0, rest - 500))  # the freshest 500, 100 sampled before them
    assert m["data_window"]["holdout_lists"] == 60 and m["data_window"]["train_lists"] == train
    assert m["data_window"]["lists"] == train + 60
    assert m["data_window"]["from"] >= min(x.served_at for x in acted_on).isoformat()
    assert m["data_window"]["to"] == max(x.served_at for x in acted_on).isoformat()
    # The holdout is the freshest lists and never among those trained on.
    assert m["stream"]["holdout"]["from"] >= m["stream"]["train"]["to"]
    consumer = kafka.consumer(s, group_id="probe")
    highs = {str(p): high for (_, p), (_, high) in kafka.watermarks(consumer, [s.topics.labeled]).items()}
    consumer.close()
    assert m["stream"]["offsets"] == highs and sum(highs.values()) == len(records)
    assert m["stream"]["invalid"] == 1 and m["stream"]["corrections"] == 1
    assert m["stream"]["skipped"]["other_schema"] == 1
    assert m["gate"]["decision"] == "promote" and m["gate"]["lists"] == 60
    assert m["training"]["learning_rate"] == s.model.learning_rate  # the offline run's unless set
    lo, hi = m["gate"]["ci95"]
    assert lo <= m["gate"]["diff"] <= hi
    assert m["metrics"]["holdout_map@5"] == m["gate"]["candidate"]["map@5"]
    assert "serving_holdout_map@5" in m["metrics"] and "holdout_map@5_diff" in m["metrics"]
    bias = m["position_bias"]
    # Measured over the recent window the pool holds: 2 x (fresh + holdout) lists.
    assert bias["lists"] == min(len(lists) + 1, 2 * (500 + 60))
    assert bias["ctr"][0] > 0 and bias["propensity"][0] == 1.0
    assert bias["inverse_propensity"]["tried"] == ["plain", "ipw"]
    assert set(bias["inverse_propensity"]["holdout_map@5"]) == {"plain", "ipw"}
    assert reg.statuses(registry)[new] == "serving"
    [update] = model_updates(s)
    assert update.model_version == new and update.uri == f"registry:{new}"
    assert update.manifest_sha256 == version.manifest_sha256 and update.parent_version == "v1"
    # The version serves: the scorer's loader accepts it, with its query table: the most frequent
    # of the texts it trained on and of its parent's head, embedded by its own fine-tuned encoder.
    served = load_served_model(registry, new)
    assert served.version == new
    parent_head = set(load_served_model(registry, "v1").queries.rows)
    listed = {encoder_key(served.tokenizer, x.text) for x in acted_on}  # it trained on most of them
    shipped = set(served.queries.rows)
    assert shipped <= listed | parent_head and shipped - parent_head
    assert len(shipped) <= s.trainer.shipped_queries
    some = sorted(shipped - parent_head)[:20]
    assert np.allclose(served.queries.emb[[served.queries.rows[t] for t in some]],
                       encode_texts(served.encoder, served.tokenizer, some), atol=1e-5)
    print(f"\ncycle over {len(lists)} lists (tiny model): {seconds:.1f} s, phases {m['cycle']['phases_s']}")

    # Nothing new on the topic: the next cycle has nothing to do.
    assert once(s) == Outcome.NOTHING
    assert "no labeled lists since" in capsys.readouterr().out


def test_the_service_runs_a_cycle_once_enough_new_lists_arrived(settings: Settings, registry: Path,
                                                                 redis_client) -> None:
    lists = served_lists()
    s = trainer_settings(settings, registry, min_new_lists=len(lists), learning_rate=3e-3)
    trainer = ContinuousTrainer(s)
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        publish(s, labeled_records(s, lists[: len(lists) // 2]))
        wait_until(lambda: trainer.pool.records == len(lists) // 2, 30, what="half the lists read")
        assert reg.serving_version(registry) == "v1"  # not enough new lists: no cycle
        publish(s, labeled_records(s, lists[len(lists) // 2 :]))
        wait_until(lambda: reg.serving_version(registry) != "v1", 120, 0.2, "a cycle promoted a version")
    finally:
        stop.set()
        thread.join(60)
        trainer.close()
    new = reg.serving_version(registry)
    manifest = reg.load_version(registry, new).manifest
    assert manifest["parent_version"] == "v1" and manifest["training"]["learning_rate"] == 3e-3
    cycles = trainer.metrics.registry.get_sample_value
    assert cycles("shoprank_trainer_cycles_total", {"outcome": "promoted"}) == 1
    assert trainer.lease.holder() is None  # released after the cycle


def poison(mode: str):  # type: ignore[no-untyped-def]
    """A fit that leaves a deliberately bad candidate: NaN scores, or every ranking reversed."""
    real = continuous.fit

    def bad_fit(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(model, *args, **kwargs)
        last = model.head.mlp[-1]
        with torch.no_grad():
            if mode == "nan":
                last.bias.fill_(float("nan"))
            else:  # scores = mlp(x) + text_scale * text_sim: negate both parts
                last.weight.neg_()
                last.bias.neg_()
                model.head.text_scale.neg_()
        return result

    return bad_fit


@pytest.mark.parametrize("mode", ["nan", "reversed"])
def test_the_gate_rejects_a_bad_candidate_and_keeps_serving(settings: Settings, registry: Path, redis_client,
                                                           monkeypatch, capsys, mode: str) -> None:
    s = trainer_settings(settings, registry, gate_margin=0.0, position_debias="off")
    publish(s, labeled_records(s, served_lists()))
    monkeypatch.setattr(continuous, "fit", poison(mode))
    assert once(s) == Outcome.REJECTED
    assert reg.serving_version(registry) == "v1"
    if mode == "nan":  # NaN weights fail the export check (onnxruntime against torch): no graph to keep
        assert [v for v in reg.list_versions(registry) if v != "v1"] == []
        [entry] = [e for e in reg.history(registry) if e["event"] == "rejected"]
        assert "export check" in entry["reason"] and "nan" in entry["reason"]
        assert model_updates(s) == []
        return
    [rejected] = [v for v in reg.list_versions(registry) if v != "v1"]
    manifest = reg.load_version(registry, rejected).manifest
    assert manifest["gate"]["decision"] == "reject"
    [entry] = [e for e in reg.history(registry) if e["version"] == rejected]
    assert entry["event"] == "rejected"
    expected = "non-finite scores" if mode == "nan" else "trails the serving version's"
    assert expected in entry["reason"] and manifest["gate"]["reasons"][0] in entry["reason"]
    if mode == "reversed":
        assert manifest["gate"]["diff"] < 0 and manifest["gate"]["ci95"][1] < 0
    assert reg.statuses(registry) == {"v1": "serving", rejected: "rejected"}
    assert model_updates(s) == []  # nothing announced
    capsys.readouterr()
    commands.cmd_model_list(argparse.Namespace(json=False), s)
    listing = capsys.readouterr().out
    assert f"{rejected}" in listing and "rejected" in listing and "1 rejected" in listing


# --- rollback ------------------------------------------------------------------------------------------


def test_rollback_restores_the_previous_version_and_announces_it(settings: Settings, registry: Path,
                                                                 redis_client, capsys) -> None:
    s = trainer_settings(settings, registry)
    tiny_version(registry, "v2", seed=14)
    reg.set_serving(registry, "v2", reason="test")
    args = argparse.Namespace(version=None, reason="clicks fell", wait=5.0)
    assert commands.cmd_model_rollback(args, s) == 0
    assert reg.serving_version(registry) == "v1"
    assert "rolled back v2 -> v1: clicks fell" in capsys.readouterr().out
    events = [(e["version"], e["event"]) for e in reg.history(registry)]
    assert events[-2:] == [("v1", "rollback_to"), ("v2", "rolled_back")]
    assert reg.statuses(registry) == {"v1": "serving", "v2": "rolled back"}
    [update] = model_updates(s)
    assert update.model_version == "v1" and update.uri == "registry:v1"
    # Nothing before v1 to go back to: said, not done.
    assert commands.cmd_model_rollback(args, s) == 1
    assert "no earlier version" in capsys.readouterr().out
    assert reg.serving_version(registry) == "v1"
    # An explicit version is honoured.
    assert commands.cmd_model_rollback(argparse.Namespace(version="v2", reason=None, wait=5.0), s) == 0
    assert reg.serving_version(registry) == "v2"
    capsys.readouterr()
    commands.cmd_model_list(argparse.Namespace(json=True), s)
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["v2"]["status"] == "serving" and rows["v1"]["status"] == "rolled back"


def guardrail_lists(version: str, n: int, clicked_at: int) -> list[LabeledList]:
    at = datetime(2011, 10, 1, tzinfo=UTC)
    return [LabeledList(list_id=f"{version}-{i}", query_id=f"{version}-{i}", user_id=f"u{i}", session_id="s",
                        text="halo", model_version=version,
                        products=[LabeledProduct(product_id=f"p{k}", position=k, score=-k,
                                                 grade=int(k == clicked_at)) for k in range(1, 11)],
                        served_at=at + timedelta(seconds=i), timestamp=at + timedelta(seconds=i, minutes=30))
            for i in range(n)]


def test_the_guardrail_rolls_back_a_version_whose_click_mrr_falls(settings: Settings, registry: Path,
                                                                  redis_client) -> None:
    s = trainer_settings(settings, registry)
    tiny_version(registry, "v2", seed=14)
    reg.set_serving(registry, "v2", reason="gate passed")
    trainer = ContinuousTrainer(s)
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        # v2 on probation: too few lists of its own yet, then as good as v1: it stays.
        publish(s, labeled_records(s, guardrail_lists("v1", 30, clicked_at=1)))
        publish(s, labeled_records(s, guardrail_lists("v2", 10, clicked_at=10)))
        wait_until(lambda: trainer.pool.records == 40, 30, what="the trainer read the lists")
        assert trainer.guardrail_verdict() is None and reg.serving_version(registry) == "v2"
        # Then v2's served lists show clicks far down the list: click MRR 0.1 against 1.0.
        publish(s, labeled_records(s, guardrail_lists("v2", 30, clicked_at=10)[10:]))
        wait_until(lambda: reg.serving_version(registry) == "v1", 30, what="the guardrail rolled back")
    finally:
        stop.set()
        thread.join(30)
        trainer.close()
    entry = [e for e in reg.history(registry) if e["event"] == "rolled_back"][-1]
    assert entry["version"] == "v2" and entry["by"] == "guardrail"
    # The verdict comes once v2 has guardrail_min_lists (20) lists: the trainer may have read 20 to
    # 30 of them by then, as its polls split the published records.
    judged = re.search(r"click MRR of v2 is 0\.1000 over (\d+) served lists", entry["reason"])
    assert judged and 20 <= int(judged.group(1)) <= 30 and "v1's 1.0000 over 30" in entry["reason"], entry
    assert trainer.metrics.registry.get_sample_value("shoprank_trainer_rollbacks_total") == 1
    [update] = model_updates(s)
    assert update.model_version == "v1"
    # The rollback target is not on probation: the guardrail leaves it be.
    assert trainer.guardrail_verdict() is None


# --- the lease -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_the_lease_keeps_a_second_trainer_out(settings: Settings, registry: Path, redis_at: RedisAt,
                                              topology: str, capsys) -> None:
    settings, redis_client = redis_at(topology, settings)
    s = trainer_settings(settings, registry, lease_ttl_s=0.6)
    first = Lease(redis_client, 0.6)
    second = Lease(redis_client, 0.6)
    assert first.acquire() and not second.acquire()
    assert second.holder() == first.token
    assert not second.renew() and not second.release() and first.holder() == first.token
    # A trainer started now says who holds it and exits.
    report = run_once(s)
    assert report.outcome == Outcome.LEASE_HELD and first.token in report.reason
    assert once(s) == Outcome.LEASE_HELD and first.token in capsys.readouterr().out
    assert reg.list_versions(registry) == ["v1"]
    assert first.release() and second.acquire()
    second.release()
    # A holder keeps it past its TTL by renewing it; another waits until it is released.
    with first.held() as lease:
        deadline = time.monotonic() + 1.5  # 2.5 TTLs of work
        while time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.holder() == first.token and not lease.lost.is_set()
        with pytest.raises(LeaseHeld), second.held(wait_s=0.3):
            pass
    assert first.holder() is None
    # A holder that stops renewing (crashed) loses it after the TTL.
    assert first.acquire()
    wait_until(lambda: second.acquire(), 5, what="the lease expired")
    assert second.holder() == second.token and not first.renew() and first.lost.is_set()
    second.release()


# --- scorers resolve versions under their own registry -------------------------------------------------


def test_a_scorer_loads_announced_versions_from_its_own_registry(registry: Path, tmp_path: Path) -> None:
    tiny_version(registry, "v2", seed=14)
    holder = ModelHolder(load_served_model(registry, "v1", device="cpu"), registry, "cpu", ScorerMetrics())
    v1, v2 = reg.load_version(registry, "v1"), reg.load_version(registry, "v2")
    now = datetime.now(UTC)
    assert holder.swap(ModelUpdate(model_version="v2", uri="registry:v2", manifest_sha256=v2.manifest_sha256,
                                   created_at=now))
    assert holder.current.version == "v2"
    # An announcement from before references: a path on another machine; only the name counts.
    assert holder.swap(ModelUpdate(model_version="v1", uri="/elsewhere/models/v1",
                                   manifest_sha256=v1.manifest_sha256, created_at=now))
    assert holder.current.version == "v1"
    # A uri naming another version than announced, or a version this registry lacks: refused.
    assert not holder.swap(ModelUpdate(model_version="v2", uri="registry:v3",
                                       manifest_sha256=v2.manifest_sha256, created_at=now))
    assert not holder.swap(ModelUpdate(model_version="v9", uri="registry:v9",
                                       manifest_sha256=v2.manifest_sha256, created_at=now))
    assert holder.current.version == "v1"
    assert reg.version_of_uri("registry:v1") == "v1" and reg.version_of_uri("/a/b/v1/") == "v1"
    with pytest.raises(reg.RegistryError):
        reg.version_of_uri("registry:")


# --- pieces --------------------------------------------------------------------------------------------


def test_the_newest_revision_of_a_list_wins(settings: Settings) -> None:
    s = trainer_settings(settings, Path("/nonexistent"))
    first = guardrail_lists("v1", 1, clicked_at=3)[0]
    # The correction, then a stale redelivery of the first revision.
    publish(s, labeled_records(s, [first, purchased(first), first]))
    pool = LabeledPool(s)
    try:
        assert pool.read() == 3
        [held] = pool.all_lists()
        assert held.revision == 2 and held.grades.max() == 3
        assert pool.corrections == 1 and pool.superseded == 1
        assert pool.read() == 0  # nothing new
    finally:
        pool.close()


def test_lists_are_cut_to_their_top_positions_plus_every_product_acted_on() -> None:
    lst = guardrail_lists("v1", 1, clicked_at=9)[0]
    lst = replace(lst, features=ServedFeatures.pack(FEATURE_SCHEMA, np.arange(10 * 28).reshape(10, 28)))
    cut = compact(lst, max_list_len=4)
    assert cut.positions.tolist() == [1, 2, 3, 4, 9]
    assert cut.product_ids == ["p1", "p2", "p3", "p4", "p9"]
    assert cut.features is not None and cut.features[4, 0] == 8 * 28
    ex = to_examples([cut], {"p1": 0, "p9": 1}, 2, history_len=3, n_features=28,
                     bias=position_bias([cut] * 30, min_impressions=1), clip=10.0)
    assert ex.cand_idx.tolist() == [[0, 2, 2, 2, 1]] and ex.grades.tolist() == [[0, 0, 0, 0, 1]]
    assert ex.gain_weight is not None and ex.gain_weight[0, 4] == pytest.approx(1.0)


def test_position_bias_and_bootstrap() -> None:
    lists = [*guardrail_lists("a", 60, clicked_at=1), *guardrail_lists("b", 30, clicked_at=2),
             *guardrail_lists("c", 10, clicked_at=5)]
    bias = position_bias([compact(x, 10) for x in lists], max_position=10)
    assert bias.ctr[:2] == [0.6, 0.3] and bias.propensity[:3] == [1.0, 0.5, 0.0]
    assert bias.propensity[4] == 0.0  # made non-increasing
    assert bias.weights(np.array([1, 2, 5]), clip=10).tolist() == [1.0, 2.0, 10.0]
    diff = np.random.default_rng(0).normal(0.1, 0.05, 500)
    lo, hi = paired_bootstrap(diff, 1000)
    assert lo < diff.mean() < hi and hi - lo < 0.02
    assert paired_bootstrap(np.zeros(10), 200) == (0.0, 0.0)


def test_click_mrr_counts_lists_without_clicks_as_zero() -> None:
    from trainer.labeled import click_mrr

    lists = [compact(x, 10) for x in guardrail_lists("a", 2, clicked_at=2)]
    lists += [compact(x, 10) for x in guardrail_lists("b", 2, clicked_at=99)]
    assert click_mrr(lists) == pytest.approx(0.25)
    by_version: dict[str, list] = defaultdict(list)
    for x in lists:
        by_version[x.model_version].append(x)
    assert click_mrr(by_version["b"]) == 0.0


def test_inverse_propensity_weights_weigh_whole_lists() -> None:
    """One click per list: a weight on the click's gain alone would cancel in the softmax target,
    so each list's loss is weighted by its clicks' inverse propensity (self-normalized)."""
    from trainer.losses import listwise_softmax_loss

    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    gains = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    each = -torch.log_softmax(scores, -1)[[0, 1], [1, 0]]
    weighted = listwise_softmax_loss(scores, gains, list_weight=torch.tensor([1.0, 3.0]))
    assert torch.isclose(weighted, (each[0] + 3 * each[1]) / 4)
    assert torch.isclose(listwise_softmax_loss(scores, gains), each.mean())


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_the_candidates_product_table_takes_the_live_vectors_from_redis(
        settings: Settings, registry: Path, redis_at: RedisAt, topology: str) -> None:
    """Products the embedder stored for the parent's product tower after training: an edited one
    overlays its shipped row, a new one extends the table (as every scorer's table does)."""
    settings, redis_client = redis_at(topology, settings)
    from core.layout import product_tower
    from features.embeddings import ProductEmbeddings, encode_value, text_digest
    from trainer.continuous import product_table

    parent = reg.load_version(registry, "v1")
    tower = product_tower(parent.manifest)
    assert tower is not None
    shipped = json.loads((parent.path / "product_ids.json").read_text())
    dim = np.load(parent.path / "product_emb.npy").shape[1]
    edited, new = np.full(dim, 0.5, np.float32), np.full(dim, -0.25, np.float32)
    ProductEmbeddings(redis_client, tower.id).write([
        (shipped[0], encode_value(1, text_digest("edited"), edited)),
        ("brand-new", encode_value(1, text_digest("new"), new)),
    ])
    catalog, added = product_table(trainer_settings(settings, registry), parent)
    assert added == 1 and catalog.product_ids == [*shipped, "brand-new"]
    assert np.array_equal(catalog.embeddings[0], edited) and np.array_equal(catalog.embeddings[-1], new)


def test_a_missing_labeled_topic_is_nothing_to_do_said_plainly(settings: Settings, registry: Path,
                                                              redis_client) -> None:
    s = trainer_settings(settings, registry)
    missing = s.topics.model_copy(update={"labeled": f"missing-{uuid.uuid4().hex[:6]}"})
    s = s.model_copy(update={"topics": missing})
    report = run_once(s)
    assert report.outcome == Outcome.NOTHING and "does not exist: run `shoprank topics`" in report.reason


def test_no_time_left_to_fine_tune_publishes_nothing(settings: Settings, registry: Path,
                                                     redis_client) -> None:
    s = trainer_settings(settings, registry, max_cycle_s=0.01)
    publish(s, labeled_records(s, served_lists()))
    report = run_once(s)
    assert report.outcome == Outcome.NOTHING and "no time left to fine-tune" in report.reason
    assert reg.list_versions(registry) == ["v1"] and reg.serving_version(registry) == "v1"
