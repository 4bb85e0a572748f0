"""The training loop: listwise fine-tuning of encoder and head, early stopping on a plateau.

Examples are built point-in-time by :mod:`trainer.examples`. Each step encodes only the batch's
distinct query texts (dynamic padding), looks candidates up in the version's product embedding
table, and scores them with the head. Validation ranks every candidate of the held-out
examples and reports MAP@5; the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog
import torch
from tokenizers import Tokenizer

from core.progress import progress
from evaluation import metrics
from trainer.losses import listwise_softmax_loss
from trainer.model import PersonalRanker
from trainer.tokens import pad, token_ids

log = structlog.get_logger(__name__)

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def map_at_5(scores: np.ndarray, grades: np.ndarray, valid: np.ndarray) -> float:
    """Mean MAP@5 (evaluation.metrics), the validation figure for early stopping."""
    return float(metrics.per_query(scores, grades, valid)["map@5"].mean())


@dataclass
class Examples:
    """Ranking lists as arrays. Row e: one query, its K candidates, their gains and features."""

    texts: list[str]  # distinct query texts
    text_id: np.ndarray  # [E] index into texts
    cand_idx: np.ndarray  # [E, K] rows of the product embedding table
    grades: np.ndarray  # [E, K] int, 0 = not chosen; gain 2**grade - 1
    dense: np.ndarray  # [E, K, F] float32
    hist_idx: np.ndarray  # [E, R]
    hist_w: np.ndarray  # [E, R] float32
    valid: np.ndarray  # [E, K] bool, False for padding
    # [E, K] float32 multiplying each candidate's gain (e.g. inverse propensity of its served
    # position); None: every gain counts as graded
    gain_weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.text_id)

    def narrowed(self, width: int) -> Examples:
        """The first ``width`` candidates of each list (lists are left-aligned, padding last)."""
        return Examples(self.texts, self.text_id, self.cand_idx[:, :width], self.grades[:, :width],
                        self.dense[:, :width], self.hist_idx, self.hist_w, self.valid[:, :width],
                        None if self.gain_weight is None else self.gain_weight[:, :width])

    def subset(self, rows: np.ndarray) -> Examples:
        return Examples(self.texts, self.text_id[rows], self.cand_idx[rows], self.grades[rows],
                        self.dense[rows], self.hist_idx[rows], self.hist_w[rows], self.valid[rows],
                        None if self.gain_weight is None else self.gain_weight[rows])


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 2e-4
    encoder_learning_rate: float = 2e-5
    patience: int = 1
    max_minutes: float = 20.0
    seed: int = 13
    progress: bool = True
    # With ``decay``, learning rates warm up over the first 5% of steps, then fall linearly to zero
    # at the end of ``schedule_epochs`` epochs (``epochs`` when None), so a refit that stops early
    # follows the same path; without it they stay constant.
    decay: bool = False
    schedule_epochs: int | None = None
    # Fine-tuning a served version keeps its feature standardization (the head learned on it);
    # without this, ``fit`` sets it from the training lists.
    keep_scaling: bool = False
    # Stop mid-epoch once this many seconds have passed (the continuous trainer's cycle budget);
    # ``max_minutes`` is checked only between epochs.
    deadline_s: float | None = None


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "epochs"
    refit_epochs: int = 0  # then refit on training and validation lists for this many (0: no refit)


class TextBatcher:
    """Tokenizes each distinct text once; pads a batch to its longest member (dynamic padding)."""

    def __init__(self, tokenizer: Tokenizer, texts: list[str], max_len: int) -> None:
        self.ids = token_ids(tokenizer, texts, max_len)

    def __call__(self, text_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Padded ids and mask of the distinct texts, and each row's index into them."""
        distinct, inverse = np.unique(text_ids, return_inverse=True)
        ids, mask = pad([self.ids[i] for i in distinct])
        return ids, mask, inverse


def forward(model: PersonalRanker, batcher: TextBatcher, product_emb: torch.Tensor,
            ex: Examples) -> torch.Tensor:
    """Scores [E, K]: each distinct query is encoded once, then shared by its rows."""
    ids, mask, inverse = batcher(ex.text_id)
    q = model.query(ids, mask)[torch.from_numpy(inverse)]
    cand = product_emb[torch.from_numpy(ex.cand_idx)]
    hist = product_emb[torch.from_numpy(ex.hist_idx)]
    return model.rank(q, cand, hist, torch.from_numpy(ex.hist_w), torch.from_numpy(ex.dense))


def grouped_order(text_id: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffled order that keeps each text's lists together.

    A batch then holds few distinct queries, and the encoder (the cost of a step on a CPU) runs
    once per distinct query: an epoch encodes each distinct query about once instead of once
    per list.
    """
    rows = rng.permutation(len(text_id))
    rows = rows[np.argsort(text_id[rows], kind="stable")]
    starts = np.flatnonzero(np.r_[True, np.diff(text_id[rows]) != 0])
    groups = np.split(rows, starts[1:])
    return np.concatenate([groups[i] for i in rng.permutation(len(groups))])


def set_feature_scaling(model: PersonalRanker, train: Examples) -> list[int]:
    """Standardize dense features with the training set's statistics (stored in the graph).

    A feature that never varied in training (Best Buy has no impressions, so impression counts
    and click-through are constant there) taught the model nothing: it is switched off, so a
    value it takes in production cannot move scores. Returns the indices switched off.
    """
    values = train.dense[train.valid]
    std = values.std(0)
    constant = np.flatnonzero(std < 1e-6)
    model.head.mean.copy_(torch.from_numpy(values.mean(0)))
    model.head.std.copy_(torch.from_numpy(np.where(std < 1e-6, 1.0, std.clip(min=1e-3))))
    model.head.keep[torch.from_numpy(constant)] = 0.0
    return constant.tolist()


def predict(model: PersonalRanker, batcher: TextBatcher, product_emb: torch.Tensor, ex: Examples,
            batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(ex), batch_size):
            rows = np.arange(start, min(start + batch_size, len(ex)))
            scores = forward(model, batcher, product_emb, ex.subset(rows))
            out.append(scores.masked_fill(~torch.from_numpy(ex.valid[rows]), float("-inf")).numpy())
    return np.concatenate(out) if out else np.zeros((0, ex.cand_idx.shape[1]), np.float32)


def fit(model: PersonalRanker, tokenizer: Tokenizer, product_emb: np.ndarray, train: Examples,
        val: Examples | None, cfg: FitConfig, metric: Metric = map_at_5) -> FitResult:
    """Train ``model`` in place; leaves it holding the best validation epoch's weights.

    Without ``val`` it trains for ``cfg.epochs`` and keeps the last weights.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.monotonic()
    table = torch.from_numpy(product_emb.astype(np.float32))
    batcher = TextBatcher(tokenizer, train.texts, model.cfg.max_query_len)
    unused = [] if cfg.keep_scaling else set_feature_scaling(model, train)
    if unused:
        log.info("features_unused", features=[model.cfg.feature_names[i] for i in unused],
                 reason="constant in training")
    model.freeze_lower_layers()
    encoder_params = [p for p in model.query.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": model.head.parameters(), "lr": cfg.learning_rate},
        {"params": encoder_params, "lr": cfg.encoder_learning_rate},
    ], weight_decay=0.01)

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total = max(1, steps_per_epoch * (cfg.schedule_epochs or cfg.epochs))
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
        if cfg.decay else 1.0)

    texts = train.texts if val is None else val.texts
    if texts is not train.texts:
        raise ValueError("train and val examples must share one list of texts")

    def validate() -> float:
        if val is None:
            return 0.0
        return metric(predict(model, batcher, table, val), val.grades, val.valid)

    best = validate()
    result = FitResult(best_epoch=0, best_metric=best, history=[{"epoch": 0, "val_metric": best}])
    log.info("train_epoch", epoch=0, examples=len(train),
             **({"val_metric": round(best, 4)} if val is not None else {}))
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = grouped_order(train.text_id, rng)
        losses = []
        bar = progress(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                       leave=False, enabled=cfg.progress)
        for start in bar:
            if cfg.deadline_s is not None and time.monotonic() - started > cfg.deadline_s:
                result.stopped = "time budget"
                break
            batch = train.subset(order[start : start + cfg.batch_size])
            scores = forward(model, batcher, table, batch)
            gains = torch.exp2(torch.from_numpy(batch.grades).float()) - 1
            list_weight = None
            if batch.gain_weight is not None:
                # The softmax target is normalized per list, so weights inside a list only move
                # weight between its positives; a list's own weight is its positives' mean weight
                # (for one click: 1 / the propensity of the position it was at).
                weighted = gains * torch.from_numpy(batch.gain_weight)
                list_weight = weighted.sum(-1) / gains.sum(-1).clamp(min=1e-12)
                gains = weighted
            loss = listwise_softmax_loss(scores, gains, torch.from_numpy(batch.valid), list_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if not losses:  # the deadline passed before this epoch's first step
            break
        current = validate()
        elapsed = (time.monotonic() - started) / 60
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_metric": current,
                               "steps": len(losses)})
        log.info("train_epoch", epoch=epoch, loss=round(float(np.mean(losses)), 4), minutes=round(elapsed, 2),
                 **({"val_metric": round(current, 4)} if val is not None else {}))
        if current > best + 1e-4 or val is None:
            best, stale = current, 0
            result.best_epoch, result.best_metric = epoch, best
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if stale > cfg.patience:
            result.stopped = "plateau"
            break
        if result.stopped == "time budget" or elapsed > cfg.max_minutes:
            result.stopped = "time budget"
            break
    model.load_state_dict(best_state)
    result.seconds = time.monotonic() - started
    return result
