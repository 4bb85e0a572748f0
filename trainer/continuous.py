"""``shoprank trainer``: keep fine-tuning the serving ranker on what shoppers did with what they
were served, gate each candidate, promote and announce the good ones, roll back the bad ones.

A cycle (every ``interval_s`` of wall time, or once ``min_new_lists`` new labeled lists arrived;
``--once``: one now):

1. reads the labeled topic up to its high watermarks (:class:`trainer.labeled.LabeledPool`: the
   newest revision of each list wins, so a late purchase's correction replaces the first one);
2. keeps the acted-on lists whose served features are in the serving version's feature schema
   (the others are counted, never mixed in), the freshest ``holdout_lists`` of them held out;
3. measures position bias (clicks by served position) and fine-tunes, starting from the serving
   version's weights and feature scaling, on the ``fresh_lists`` newest remaining lists plus
   ``older_sample`` sampled older ones, for ``epochs`` and at most ``max_cycle_s`` from the
   cycle's start; with ``position_debias=auto`` it also fine-tunes with inverse-propensity
   weighted gains and keeps that variant only when it ranks the holdout better;
4. exports the candidate (ONNX, checked against torch), gates it (:mod:`trainer.gate`) and
   publishes it to the registry either way, its manifest recording the parent, the data window,
   the topic offsets read up to, metrics, the position-bias measurement and the gate's decision;
5. promotes it (SERVING + an announcement every scorer swaps on) when the gate passed and the
   version it was trained from still serves; otherwise logs it as rejected, with the reason.

Between cycles the service follows the topic and runs the online guardrail: once a promoted
version has served ``guardrail_min_lists`` labeled lists and its predecessor as many, a click MRR
trailing the predecessor's by more than ``guardrail_margin`` rolls it back (SERVING, log entry
with the reason, announcement).

One trainer writes at a time: every cycle and every rollback holds the lease (:mod:`trainer.lease`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge
from tokenizers import Tokenizer

from core import layout
from core import registry as reg
from core.metrics import serve_metrics
from core.registry import ModelVersion, load_version, publish_version, serving_version
from core.settings import Settings
from features.embeddings import ProductEmbeddings
from features.memory import MemoryStore
from features.read import feature_schema
from features.redis_store import connect
from scorer.runtime import QueryTable, head_queries
from trainer.examples import Catalog
from trainer.fit import FitConfig, FitResult, TextBatcher, fit, map_at_5, predict
from trainer.gate import PROMOTE, GateResult, judge
from trainer.labeled import (
    LabeledPool,
    ServedList,
    TopicMissing,
    click_mrr,
    ipw_weights,
    position_bias,
    to_examples,
    usable,
)
from trainer.lease import Lease, LeaseHeld
from trainer.model import PersonalRanker, RankerConfig, load_encoder
from trainer.pipeline import TrainRun, write_version

log = structlog.get_logger(__name__)

SCRATCH_PREFIX = ".candidate-"


class Outcome(IntEnum):
    """What a cycle did; ``shoprank trainer --once`` exits with it."""

    PROMOTED = 0
    REJECTED = 3
    NOTHING = 4
    LEASE_HELD = 5


@dataclass
class CycleReport:
    outcome: Outcome
    reason: str
    version: str | None = None
    seconds: float = 0.0
    gate: GateResult | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


class TrainerMetrics:
    """Prometheus figures of the service (served on ``metrics_port`` when set)."""

    def __init__(self, registry_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        self.cycles = Counter("shoprank_trainer_cycles", "Trainer cycles by outcome", ["outcome"],
                              registry=self.registry)
        self.rollbacks = Counter("shoprank_trainer_rollbacks", "Versions rolled back by the guardrail",
                                 registry=self.registry)
        self.cycle_seconds = Gauge("shoprank_trainer_cycle_seconds", "Duration of the last cycle",
                                   registry=self.registry)
        self.lists = Gauge("shoprank_trainer_labeled_lists", "Labeled lists held", registry=self.registry)
        # Read from the registry's log at each scrape: a promotion or rollback by anyone (another
        # trainer, `shoprank train`, `shoprank model rollback`) counts, and a restart forgets none.
        self.last_update = Gauge("shoprank_trainer_last_model_update_timestamp_seconds",
                                 "When the serving version last changed (promotion or rollback)",
                                 registry=self.registry)
        if registry_dir is not None:
            self.last_update.set_function(lambda: last_model_update(registry_dir))


def last_model_update(registry_dir: Path) -> float:
    """Unix time of the registry log's last promotion or rollback (0: none yet)."""
    changes = [e["at"] for e in reg.history(registry_dir)
               if e.get("event") in (reg.PROMOTED, reg.ROLLBACK_TO)]
    return datetime.fromisoformat(changes[-1]).timestamp() if changes else 0.0


# --- the registry as the trainer sees it ---------------------------------------------------------


@dataclass(frozen=True)
class LastCycle:
    version: str
    offsets: dict[int, int]
    created_at: datetime
    tail_s: float | None  # what its export and gate took


def _tail_s(manifest: dict[str, Any]) -> float | None:
    phases = manifest.get("cycle", {}).get("phases_s", {})
    return float(phases["export"] + phases["gate"]) if "export" in phases and "gate" in phases else None


def last_stream_version(registry: Path, topic: str) -> LastCycle | None:
    """The newest version trained from ``topic`` (promoted or not): where the last cycle read to."""
    best: LastCycle | None = None
    for name in reg.list_versions(registry):
        try:
            manifest = json.loads((registry / name / reg.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        stream = manifest.get("stream") or {}
        if stream.get("topic") != topic:
            continue
        created = datetime.fromisoformat(manifest["created_at"])
        if best is None or created > best.created_at:
            offsets = {int(p): int(o) for p, o in stream.get("offsets", {}).items()}
            best = LastCycle(name, offsets, created, _tail_s(manifest))
    return best


def new_version_name(registry: Path) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name, n = f"{stamp}-stream", 1
    while (registry / name).exists():
        n += 1
        name = f"{stamp}-stream-{n}"
    return name


def announce_version(settings: Settings, version: ModelVersion) -> None:
    from trainer.commands import announce  # one announcement code path for every command

    announce(settings, version)


def rollback(settings: Settings, target: str | None, reason: str, by: str) -> tuple[str, str]:
    """Serve ``target`` (default: the version that served before this one and was not rolled
    back, else its parent) instead of the one serving; log both sides; announce. The caller
    holds the lease. Returns (from, to)."""
    registry = settings.model.registry_dir
    current = serving_version(registry)
    if current is None:
        raise reg.RegistryError(f"no version is serving in {registry}: nothing to roll back")
    target = target or default_rollback_target(registry)
    if target is None:
        raise reg.RegistryError(f"{current} serves and the registry names no earlier version to roll back to")
    if target == current:
        raise reg.RegistryError(f"{target} is serving already")
    reg.set_serving(registry, target, reg.ROLLBACK_TO, reason=reason, by=by)
    reg.record(registry, current, reg.ROLLED_BACK, reason=reason, by=by, to=target)
    log.warning("model_rolled_back", model_version=current, to=target, reason=reason, by=by)
    announce_version(settings, load_version(registry, target))
    return current, target


def default_rollback_target(registry: Path) -> str | None:
    """The latest version that served before the current one and was not itself rolled back
    (the log says), else the current version's parent."""
    current = serving_version(registry)
    entries = reg.history(registry)
    rolled_back = {e["version"] for e in entries if e.get("event") == reg.ROLLED_BACK}
    available = set(reg.list_versions(registry))
    for e in reversed(entries):
        v = e.get("version")
        if e.get("event") in (reg.PROMOTED, reg.ROLLBACK_TO):
            for name in (v, e.get("previous")):
                if name and name != current and name not in rolled_back and name in available:
                    return name
    parents = reg.lineage(registry, current)[1:] if current else []
    return next((p for p in parents if p in available), None)


# --- the trainer -----------------------------------------------------------------------------------


def load_parent(parent: ModelVersion) -> tuple[PersonalRanker, Tokenizer]:
    """The serving version's network, weights and feature scaling included, and its tokenizer."""
    cfg = RankerConfig.from_dict(parent.manifest["config"])
    model = PersonalRanker(cfg, load_encoder(None, cfg.encoder))
    state = torch.load(parent.path / layout.WEIGHTS, map_location="cpu", weights_only=True)
    # The pretrained encoder carries BERT's pooler, which the ranker never uses (it mean-pools).
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if ".pooler." not in k]
    if missing or unexpected:
        raise reg.RegistryError(f"{parent.version}: weights.pt does not fit its config "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, Tokenizer.from_file(str(parent.path / layout.TOKENIZER))


def shipped_queries(tokenizer: Tokenizer, parent: ModelVersion, lists: list[ServedList],
                    limit: int) -> list[str]:
    """The queries a candidate ships embedded (scorer.runtime.QueryTable): the most frequent of its
    lists' texts and of those its parent shipped (each of them counted once), so the table follows
    the stream's queries without forgetting the head it started from."""
    earlier = QueryTable.texts(parent.path)
    return head_queries(tokenizer, [*(sl.text for sl in lists), *earlier], limit)


def switch_on_varying(model: PersonalRanker, dense: np.ndarray, valid: np.ndarray) -> list[str]:
    """Features the parent had switched off (constant in its training data, e.g. impressions
    in a log without any) that vary in these lists are switched on, standardized with these
    lists' statistics and given zero weight in the head's first layer: the candidate starts
    ranking exactly as its parent did and learns how much they matter."""
    cfg = model.cfg
    values = dense[valid]
    if len(values) == 0:
        return []
    std = values.std(0)
    user = set(cfg.user_feature_names)
    head = model.head
    first = head.mlp[0]
    switched = []
    with torch.no_grad():
        for i, name in enumerate(cfg.feature_names):
            if head.keep[i] > 0 or std[i] < 1e-6 or (not cfg.personalized and name in user):
                continue
            head.mean[i] = float(values[:, i].mean())
            head.std[i] = float(max(std[i], 1e-3))
            head.keep[i] = 1.0
            first.weight[:, i] = 0.0
            switched.append(name)
    return switched


def product_table(settings: Settings, parent: ModelVersion) -> tuple[Catalog, int]:
    """The candidate's product table, as scorers will serve it: the parent's shipped rows,
    overlaid and extended by the vectors its product tower's embedder stored in Redis (products
    published or edited after training). Returns the table and how many products Redis added."""
    ids: list[str] = json.loads((parent.path / layout.PRODUCT_IDS).read_text())
    dim = int(parent.manifest["config"]["dim"])  # a zero-shot version may ship no rows at all
    emb = np.load(parent.path / layout.PRODUCT_EMB).astype(np.float32).reshape(len(ids), dim)
    tower = layout.product_tower(parent.manifest)
    if tower is None:
        return Catalog(ids, emb), 0
    stored = ProductEmbeddings(connect(settings.redis), tower.id).load()
    if not stored.ids or stored.vectors.shape[1] != emb.shape[1]:
        return Catalog(ids, emb), 0
    index = {p: i for i, p in enumerate(ids)}
    added: list[np.ndarray] = []
    for pid, vec in zip(stored.ids, stored.vectors, strict=True):
        row = index.get(pid)
        if row is not None:
            emb[row] = vec
        else:
            index[pid] = len(ids)
            ids.append(pid)
            added.append(vec)
    if added:
        emb = np.vstack([emb, np.asarray(added, np.float32)])
    return Catalog(ids, emb), len(added)


def _window(lists: list[ServedList]) -> dict[str, Any]:
    if not lists:
        return {"from": None, "to": None, "lists": 0}
    return {"from": min(s.served_at for s in lists).isoformat(),
            "to": max(s.served_at for s in lists).isoformat(), "lists": len(lists)}


class ContinuousTrainer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = settings.model.registry_dir
        self.pool = LabeledPool(settings, seed=settings.model.seed)
        self.lease = Lease(connect(settings.redis), settings.trainer.lease_ttl_s)
        self.metrics = TrainerMetrics(self.registry)
        self._guardrail_noted: set[str] = set()
        self._cycles = 0
        # Seconds the export and the gate took in the last cycle (what fine-tuning leaves them).
        self._tail_s: float | None = None

    def close(self) -> None:
        self.pool.close()

    # --- the guardrail ---------------------------------------------------------------------------

    def guardrail_verdict(self) -> tuple[str, str] | None:
        """(version to roll back to, why) when the serving version's click MRR trails its
        predecessor's by more than the margin over enough lists each; else None."""
        t = self.settings.trainer
        current = serving_version(self.registry)
        if current is None:
            return None
        entries = reg.history(self.registry)
        change = next((e for e in reversed(entries) if e.get("version") == current
                       and e.get("event") in (reg.PROMOTED, reg.ROLLBACK_TO)), None)
        # Only a promotion is on probation: a rollback target is what the guardrail fell back on.
        if change is None or change.get("event") != reg.PROMOTED or not change.get("previous"):
            return None
        previous = change["previous"]
        # The recent window only: the older reservoir holds acted-on lists alone (an MRR over it
        # would flatter whichever version served long ago).
        lists = list(self.pool.recent.values())
        now = [s for s in lists if s.model_version == current]
        before = [s for s in lists if s.model_version == previous]
        if len(now) < t.guardrail_min_lists or len(before) < t.guardrail_min_lists:
            return None
        mrr_now, mrr_before = click_mrr(now), click_mrr(before)
        if mrr_now < mrr_before - t.guardrail_margin:
            return previous, (
                f"guardrail: click MRR of {current} is {mrr_now:.4f} over {len(now)} served lists, "
                f"{mrr_before - mrr_now:.4f} below {previous}'s {mrr_before:.4f} over {len(before)} "
                f"(margin {t.guardrail_margin})")
        if current not in self._guardrail_noted:
            self._guardrail_noted.add(current)
            log.info("guardrail_ok", model_version=current, click_mrr=round(mrr_now, 4), previous=previous,
                     previous_click_mrr=round(mrr_before, 4), lists=len(now), previous_lists=len(before))
        return None

    def apply_guardrail(self) -> str | None:
        """Roll back when the verdict says so (the caller holds the lease); returns the version
        now serving after a rollback, else None."""
        verdict = self.guardrail_verdict()
        if verdict is None:
            return None
        target, reason = verdict
        rollback(self.settings, target, reason, by="guardrail")
        self.metrics.rollbacks.inc()
        return target

    # --- a cycle -----------------------------------------------------------------------------------

    def cycle(self, started: float | None = None) -> CycleReport:
        """One fine-tune/gate/publish cycle on the lists read so far, to end within max_cycle_s of
        ``started`` (monotonic; default now). The caller holds the lease."""
        started = time.monotonic() if started is None else started
        report = self._cycle(started)
        report.seconds = round(time.monotonic() - started, 2)
        self._cycles += 1
        self.metrics.cycles.labels(outcome=report.outcome.name.lower()).inc()
        self.metrics.cycle_seconds.set(report.seconds)
        log.info("trainer_cycle", outcome=report.outcome.name.lower(), model_version=report.version,
                 reason=report.reason, seconds=report.seconds)
        return report

    def _cycle(self, started: float) -> CycleReport:
        s, t = self.settings, self.settings.trainer
        phases: dict[str, float] = {}
        mark = started

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = round(now - mark, 2)
            mark = now

        serving = serving_version(self.registry)
        if serving is None:
            return CycleReport(Outcome.NOTHING, f"no version is serving in {self.registry}: "
                                                f"`shoprank train` or `shoprank model init` first")
        if not self.pool.offsets:
            return CycleReport(Outcome.NOTHING, f"{self.pool.topic} holds no labeled lists")
        last = last_stream_version(self.registry, self.pool.topic)
        if last is not None and self.pool.new_since(last.offsets) == 0:
            return CycleReport(Outcome.NOTHING, f"no labeled lists since {last.version}")
        parent = load_version(self.registry, serving)
        if self._tail_s is None and last is not None:
            self._tail_s = last.tail_s
        cfg = RankerConfig.from_dict(parent.manifest["config"])
        schema = feature_schema(cfg.feature_names)
        lists, skipped = usable(self.pool.all_lists(), schema)
        lists.sort(key=lambda x: (x.served_at, x.list_id))
        if skipped["other_schema"]:
            log.warning("labeled_lists_other_schema", lists=skipped["other_schema"], schema=schema,
                        model_version=serving)
        holdout, rest = lists[-t.holdout_lists:], lists[: -t.holdout_lists]
        need = 2 * t.holdout_lists  # as many to train on as held out, at least
        if len(lists) < need:
            return CycleReport(Outcome.NOTHING,
                               f"{len(lists)} usable labeled lists (acted on, schema {schema}); "
                               f"a cycle needs {need} ({t.holdout_lists} held out)")
        fresh = rest[-t.fresh_lists:]
        older_pool = rest[: max(0, len(rest) - t.fresh_lists)]
        rng = np.random.default_rng((s.model.seed, self._cycles, len(lists)))
        picked = rng.choice(len(older_pool), size=min(t.older_sample, len(older_pool)), replace=False)
        older = [older_pool[i] for i in sorted(picked)]
        train = older + fresh

        catalog, live_added = product_table(s, parent)
        table = catalog.table()
        bias = position_bias(list(self.pool.recent.values()))
        n_features = len(cfg.feature_names)
        plain = to_examples(train, catalog.index, catalog.unknown_row, cfg.history_len, n_features)
        held = to_examples(holdout, catalog.index, catalog.unknown_row, cfg.history_len, n_features)
        phase("prepare")

        model, tokenizer = load_parent(parent)
        switched = switch_on_varying(model, plain.dense, plain.valid)
        mode = t.position_debias if bias.propensity else "off"
        head_lr = t.learning_rate or s.model.learning_rate
        variants = ["plain", "ipw"] if mode == "auto" else ["ipw" if mode == "on" else "plain"]
        # Fine-tuning ends early enough for the export and the gate to finish within max_cycle_s
        # (their time as the last cycle measured it, a quarter of the budget before any did).
        tail = self._tail_s if self._tail_s is not None else t.max_cycle_s / 4
        fit_until = started + t.max_cycle_s - tail
        budget = fit_until - time.monotonic()
        trained: dict[str, tuple[PersonalRanker, FitResult, float]] = {}
        holdout_batcher = TextBatcher(tokenizer, held.texts, cfg.max_query_len)
        for n, variant in enumerate(variants):
            candidate = copy.deepcopy(model) if n < len(variants) - 1 else model
            if variant == "ipw":
                weights = ipw_weights(train, plain.cand_idx.shape[1], bias, t.ipw_clip)
                data = replace(plain, gain_weight=weights)
            else:
                data = plain
            share = (fit_until - time.monotonic()) / (len(variants) - n)  # split among those left to fit
            config = FitConfig(epochs=t.epochs, batch_size=s.model.batch_size,
                               learning_rate=head_lr,
                               encoder_learning_rate=s.model.encoder_learning_rate, patience=t.epochs,
                               max_minutes=t.max_cycle_s / 60, seed=s.model.seed, progress=False, decay=True,
                               keep_scaling=True, deadline_s=max(0.0, share))
            result = fit(candidate, tokenizer, table, data, None, config)
            score = map_at_5(predict(candidate, holdout_batcher, torch.from_numpy(table), held),
                             held.grades, held.valid) if len(variants) > 1 else float("nan")
            trained[variant] = (candidate, result, score)
        phase("fit")
        if len(variants) > 1:
            chosen = "ipw" if trained["ipw"][2] > trained["plain"][2] else "plain"
        else:
            chosen = variants[0]
        model, result, _ = trained[chosen]
        ipw = {"mode": t.position_debias, "tried": variants, "kept": chosen == "ipw", "clip": t.ipw_clip,
               "holdout_map@5": {v: round(r[2], 6) for v, r in trained.items() if not np.isnan(r[2])}}
        if sum(int(h.get("steps", 0)) for h in result.history) == 0:
            # Reading and preparing used the whole budget: a candidate equal to its parent is no
            # candidate (raise max_cycle_s, or lower fresh_lists / older_sample / holdout_lists).
            log.warning("trainer_no_time_to_fit", spent_s=round(time.monotonic() - started, 1),
                        max_cycle_s=t.max_cycle_s, phases=phases)
            return CycleReport(Outcome.NOTHING,
                               f"no time left to fine-tune within max_cycle_s={t.max_cycle_s:g} "
                               f"(reading and preparing took {phases['prepare']:.1f} s)")

        name = new_version_name(self.registry)
        self._clear_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self.registry))
        try:
            tower = parent.path / layout.PRODUCT_ENCODER  # the same tower: the same vectors in Redis
            run = TrainRun(model=model, tokenizer=tokenizer, catalog=catalog, store=MemoryStore(s.features),
                           result=result, window=(train[0].served_at, holdout[-1].served_at),
                           n_rows=len(train), product_tower=tower if tower.is_file() else None,
                           queries=shipped_queries(tokenizer, parent, [*train, *holdout], t.shipped_queries),
                           encoder_precision=s.model.query_encoder_precision)
            try:
                staged = write_version(scratch, run, metrics={}, parent=serving, name=name)
            except RuntimeError as exc:  # onnxruntime disagrees with torch (NaN weights included)
                reason = f"candidate failed its export check: {exc}"
                reg.record(self.registry, name, reg.REJECTED, reason=reason, by="trainer", serving=serving)
                log.warning("model_rejected", model_version=name, serving=serving, reason=reason)
                return CycleReport(Outcome.REJECTED, reason, name)
            phase("export")
            gate = self._judge(scratch, name, serving, holdout)
            phase("gate")
            metrics = {f"holdout_{k}": v for k, v in gate.candidate.items()}
            metrics |= {f"serving_holdout_{k}": v for k, v in gate.serving.items()}
            if gate.diff is not None:
                metrics["holdout_map@5_diff"] = gate.diff
            manifest = {k: v for k, v in staged.manifest.items() if k not in ("version", "files")}
            manifest |= {
                "trained_by": "continuous",
                "parent_version": serving,
                "created_at": datetime.now(UTC).isoformat(),
                "data_window": {**_window(train + holdout), "train_lists": len(train),
                                "holdout_lists": len(holdout)},
                "stream": {
                    "topic": self.pool.topic,
                    "offsets": {str(p): o for p, o in sorted(self.pool.offsets.items())},
                    "records_read": self.pool.records, "invalid": self.pool.invalid,
                    "corrections": self.pool.corrections, "usable_lists": len(lists), "skipped": skipped,
                    "schema": schema, "train": {"fresh": len(fresh), "older": len(older), **_window(train)},
                    "holdout": _window(holdout),
                },
                "metrics": metrics,
                "gate": gate.to_dict(),
                "position_bias": {**bias.to_dict(), "inverse_propensity": ipw},
                "features_switched_on": switched,
                "product_table": {"products": len(catalog.product_ids), "from_redis": live_added},
                "training": {"epochs": t.epochs, "learning_rate": head_lr,
                             "variant": chosen, "seconds": round(result.seconds, 1),
                             "stopped": result.stopped, "history": result.history},
                "cycle": {"phases_s": phases, "max_cycle_s": t.max_cycle_s,
                          "fit_budget_s": round(budget, 1), "reserved_for_export_and_gate_s": round(tail, 1)},
            }
            version = publish_version(self.registry, name, manifest,
                                      lambda tmp: _move_files(staged.path, tmp))
            self._tail_s = phases["export"] + phases["gate"]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self._decide(version, serving, gate)

    def _judge(self, scratch: Path, name: str, serving: str, holdout: list[ServedList]) -> GateResult:
        from scorer.runtime import EmbeddingSource, ServedModel, load_served_model

        s = self.settings
        # Both read the products embedded after training from Redis, as every scorer does.
        source = EmbeddingSource(connect(s.redis))
        try:
            # Loaded without the scorer's warm-up check: the gate is the check, and says why.
            candidate = ServedModel(load_version(scratch, name), device=s.scorer.device, embeddings=source)
        except Exception as exc:  # a graph that does not even load is a rejection with its reason
            return GateResult(decision="reject", reasons=[f"candidate does not load: {exc}"],
                              lists=len(holdout), margin=s.trainer.gate_margin, candidate_finite=False)
        serving_model = load_served_model(self.registry, serving, device=s.scorer.device, embeddings=source)
        try:
            return judge(candidate, serving_model, holdout, s)
        finally:
            candidate.close()
            serving_model.close()

    def _decide(self, version: ModelVersion, parent: str, gate: GateResult) -> CycleReport:
        reason = "; ".join(gate.reasons) or (
            f"gate passed: holdout map@5 {gate.candidate.get('map@5', 0):.4f} against the serving "
            f"version's {gate.serving.get('map@5', float('nan')):.4f} on {gate.lists} lists "
            f"(difference {gate.diff if gate.diff is not None else float('nan'):+.4f}, 95% CI {gate.ci95})")
        if gate.decision == PROMOTE:
            now = serving_version(self.registry)
            if self.lease.lost.is_set():
                reason = "the trainer lost its lease during the cycle: another trainer may be writing"
            elif now != parent:
                reason = f"{now} started serving during the cycle (trained from {parent}): not replacing it"
            else:
                reg.set_serving(self.registry, version.version, reg.PROMOTED, reason=reason, by="trainer",
                                gate_diff=gate.diff)
                announce_version(self.settings, version)
                log.info("model_promoted", model_version=version.version, previous=parent, reason=reason)
                return CycleReport(Outcome.PROMOTED, reason, version.version, gate=gate,
                                   manifest=version.manifest)
        reg.record(self.registry, version.version, reg.REJECTED, reason=reason, by="trainer", serving=parent)
        log.warning("model_rejected", model_version=version.version, serving=parent, reason=reason)
        return CycleReport(Outcome.REJECTED, reason, version.version, gate=gate, manifest=version.manifest)

    def _clear_scratch(self) -> None:
        """Scratch folders a crashed cycle left (the lease is held: none is in use)."""
        for p in self.registry.glob(f"{SCRATCH_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    # --- the service ----------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        """Follow the topic, run the guardrail on every read, a cycle when one is due."""
        t = self.settings.trainer
        self.registry.mkdir(parents=True, exist_ok=True)
        last = last_stream_version(self.registry, self.pool.topic)
        baseline = dict(last.offsets) if last else {}
        last_at = last.created_at.timestamp() if last else time.time()
        held_by: str | None = None
        missing_said = False
        log.info("trainer_started", topic=self.pool.topic, registry=str(self.registry),
                 interval_s=t.interval_s, min_new_lists=t.min_new_lists,
                 last_version=last.version if last else None)
        while not stop.is_set():
            try:
                self.pool.read()
                self.metrics.lists.set(len(self.pool.recent) + len(self.pool.older))
                new = self.pool.new_since(baseline)
                due = new >= t.min_new_lists or (new > 0 and time.time() - last_at >= t.interval_s)
                if due or self.guardrail_verdict() is not None:
                    with self.lease.held():
                        held_by = None
                        self.apply_guardrail()
                        if due:
                            self.cycle()
                            baseline, last_at = dict(self.pool.offsets), time.time()
            except LeaseHeld as exc:
                if exc.holder != held_by:  # say it once per holder, not every poll
                    held_by = exc.holder
                    log.warning("trainer_waiting_for_lease", holder=exc.holder)
            except TopicMissing as exc:
                if not missing_said:
                    missing_said = True
                    log.warning("trainer_waiting_for_topic", topic=self.pool.topic, reason=str(exc))
            except Exception:  # a failed cycle is logged; the service keeps following the topic
                log.exception("trainer_cycle_failed")
                self.metrics.cycles.labels(outcome="failed").inc()
                last_at = time.time()
            stop.wait(t.poll_s)


def _move_files(source: Path, dest: Path) -> None:
    for p in source.iterdir():
        if p.is_file() and p.name != reg.MANIFEST:
            os.replace(p, dest / p.name)


def run_once(settings: Settings, wait_s: float = 0.0) -> CycleReport:
    """One cycle now on what the topic holds (after the guardrail), holding the lease."""
    if serving_version(settings.model.registry_dir) is None:
        return CycleReport(Outcome.NOTHING, f"no version is serving in {settings.model.registry_dir}: "
                                            f"`shoprank train` or `shoprank model init` first")
    trainer = ContinuousTrainer(settings)
    try:
        with trainer.lease.held(wait_s=wait_s):
            started = time.monotonic()  # the cycle's budget includes reading the topic
            try:
                trainer.pool.read()
            except TopicMissing as exc:
                return CycleReport(Outcome.NOTHING, str(exc))
            rolled = trainer.apply_guardrail()
            report = trainer.cycle(started)
            if rolled:
                report.reason = f"(guardrail rolled back to {rolled}) {report.reason}"
            return report
    except LeaseHeld as exc:
        log.warning("trainer_lease_held", holder=exc.holder)
        return CycleReport(Outcome.LEASE_HELD, str(exc))
    finally:
        trainer.close()


def serve(settings: Settings) -> int:
    """The long-running service, until SIGTERM or Ctrl-C."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    trainer = ContinuousTrainer(settings)
    serve_metrics(settings, settings.trainer.metrics_port, "trainer", trainer.metrics.registry)
    try:
        trainer.run_forever(stop)
    finally:
        trainer.close()
    return 0
