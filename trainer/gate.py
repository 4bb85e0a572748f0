"""The gate: a candidate version serves only if it is no worse than the serving one on fresh lists.

Both versions score the same held-out labeled lists (the freshest, never trained on) through
the scorer's own path: onnxruntime via :class:`scorer.runtime.ServedModel`, fed the features as
they were served. The primary metric is MAP@5 per list (:mod:`evaluation.metrics`); the
candidate passes when its mean is at least the serving version's minus ``gate_margin``. The
difference is reported with a paired bootstrap 95% confidence interval (lists resampled with
replacement, the same lists for both versions). Sanity checks of the candidate's graph: every
score on the holdout is finite, and the time per query (micro-batches of the scorer's size, query
encoding and head) stays under ``gate_max_ms_per_query`` at the 95th percentile.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import structlog

from core.settings import Settings
from evaluation import metrics
from scorer.runtime import Batch, ServedModel
from trainer.examples import history
from trainer.labeled import ServedList

log = structlog.get_logger(__name__)

PRIMARY = "map@5"
PROMOTE, REJECT = "promote", "reject"


@dataclass
class Scored:
    """One version's scores on the holdout, padded: [lists, K], ``valid`` marks real candidates."""

    scores: np.ndarray
    grades: np.ndarray
    valid: np.ndarray
    ms_per_query: list[float]  # one figure per micro-batch: its time / its queries

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.scores[self.valid]).all())

    def per_list(self) -> dict[str, np.ndarray]:
        return metrics.per_query(np.where(self.valid, self.scores, 0.0), self.grades, self.valid)


def score_lists(model: ServedModel, lists: Sequence[ServedList], batch_size: int = 32) -> Scored:
    """Score each list's products as served, through ``model``'s graphs, in micro-batches."""
    width = max((len(s.positions) for s in lists), default=1)
    n = len(lists)
    scores = np.zeros((n, width), np.float32)
    grades = np.zeros((n, width), np.int64)
    valid = np.zeros((n, width), bool)
    timings: list[float] = []
    n_features = len(model.feature_names)
    for start in range(0, n, batch_size):
        chunk = lists[start : start + batch_size]
        k = max(len(s.positions) for s in chunk)
        cand_idx = np.full((len(chunk), k), model.unknown_row, np.int64)
        dense = np.zeros((len(chunk), k, n_features), np.float32)
        hist_idx = np.full((len(chunk), model.history_len), model.unknown_row, np.int64)
        hist_w = np.zeros((len(chunk), model.history_len), np.float32)
        for i, s in enumerate(chunk):
            assert s.product_ids is not None and s.features is not None
            m = len(s.product_ids)
            cand_idx[i, :m] = model.rows(s.product_ids)
            dense[i, :m] = s.features
            if s.history:
                hist_idx[i], hist_w[i] = history(s.history, np.asarray(s.history_weights, np.float32),
                                                 model.product_index, model.unknown_row, model.history_len)
        started = time.perf_counter()
        batch = Batch(query_emb=model.encode([s.text for s in chunk]), cand_idx=cand_idx, hist_idx=hist_idx,
                      hist_w=hist_w, dense=dense, n_candidates=[len(s.positions) for s in chunk])
        out = model.score(batch)
        timings.append((time.perf_counter() - started) * 1000 / len(chunk))
        for i, (s, row) in enumerate(zip(chunk, out, strict=True)):
            m = len(s.positions)
            scores[start + i, :m] = row
            grades[start + i, :m] = s.grades
            valid[start + i, :m] = True
    return Scored(scores, grades, valid, timings)


def paired_bootstrap(diff: np.ndarray, samples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``diff`` (per-list candidate - serving), lists resampled."""
    if len(diff) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for b in range(0, samples, 100):  # in blocks: bounded memory on large holdouts
        idx = rng.integers(len(diff), size=(min(100, samples - b), len(diff)))
        means[b : b + len(idx)] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class GateResult:
    decision: str  # PROMOTE or REJECT
    reasons: list[str]
    lists: int
    margin: float
    candidate: dict[str, float] = field(default_factory=dict)  # mean of each metric over the lists
    serving: dict[str, float] = field(default_factory=dict)
    diff: float | None = None  # candidate - serving, primary metric
    ci95: tuple[float, float] | None = None
    candidate_finite: bool = True
    candidate_ms_per_query_p95: float = 0.0
    serving_ms_per_query_p95: float = 0.0

    @property
    def promote(self) -> bool:
        return self.decision == PROMOTE

    def to_dict(self) -> dict:
        out = asdict(self)
        out["primary"] = PRIMARY
        out["ci95"] = list(self.ci95) if self.ci95 else None
        return out


def _means(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: round(float(v.mean()), 6) for k, v in per_list.items() if k in (PRIMARY, "ndcg@10", "mrr")}


def _p95(values: list[float]) -> float:
    return round(float(np.percentile(values, 95)), 3) if values else 0.0


def judge(candidate: ServedModel, serving: ServedModel, holdout: Sequence[ServedList],
          settings: Settings) -> GateResult:
    """Score both versions on ``holdout`` and decide (see the module docstring)."""
    t = settings.trainer
    batch = settings.scorer.max_batch
    cand = score_lists(candidate, holdout, batch)
    serv = score_lists(serving, holdout, batch)
    result = GateResult(decision=PROMOTE, reasons=[], lists=len(holdout), margin=t.gate_margin,
                        candidate_finite=cand.finite, candidate_ms_per_query_p95=_p95(cand.ms_per_query),
                        serving_ms_per_query_p95=_p95(serv.ms_per_query))
    serving_per_list = serv.per_list() if serv.finite else None
    if serving_per_list is not None:
        result.serving = _means(serving_per_list)
    if not cand.finite:
        bad = int((~np.isfinite(cand.scores[cand.valid])).sum())
        result.reasons.append(f"candidate gives {bad} non-finite scores on the holdout")
    else:
        candidate_per_list = cand.per_list()
        result.candidate = _means(candidate_per_list)
        if serving_per_list is not None:
            diff = candidate_per_list[PRIMARY] - serving_per_list[PRIMARY]
            result.diff = round(float(diff.mean()), 6)
            lo, hi = paired_bootstrap(diff, t.bootstrap_samples, settings.model.seed)
            result.ci95 = (round(lo, 6), round(hi, 6))
            if result.diff < -t.gate_margin:
                result.reasons.append(
                    f"{PRIMARY} {result.candidate[PRIMARY]:.4f} trails the serving version's "
                    f"{result.serving[PRIMARY]:.4f} by {-result.diff:.4f} (> margin {t.gate_margin}; "
                    f"95% CI of the difference [{lo:+.4f}, {hi:+.4f}])")
    if result.candidate_ms_per_query_p95 > t.gate_max_ms_per_query:
        result.reasons.append(f"candidate takes {result.candidate_ms_per_query_p95:.1f} ms per query (p95), "
                              f"over {t.gate_max_ms_per_query:.0f} ms")
    if result.reasons:
        result.decision = REJECT
    log.info("gate", decision=result.decision, lists=result.lists, candidate=result.candidate,
             serving=result.serving, diff=result.diff, ci95=result.ci95, reasons=result.reasons,
             candidate_ms_per_query_p95=result.candidate_ms_per_query_p95)
    return result
