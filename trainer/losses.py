"""Listwise ranking loss on graded labels (purchase > click > shown and skipped)."""

from __future__ import annotations

import torch
from torch import Tensor


def listwise_softmax_loss(scores: Tensor, gains: Tensor, valid: Tensor | None = None,
                          list_weight: Tensor | None = None) -> Tensor:
    """ListNet top-one cross-entropy: the softmax of scores against the gains' distribution.

    scores, gains: [B, N]; gains >= 0 (e.g. 2**grade - 1); lists without any gain are skipped.
    ``valid`` masks padded candidates. ``list_weight`` [B]: each list's weight in the mean
    (normalized by their sum: a self-normalized inverse-propensity estimate when they are the
    inverse propensities of the lists' clicks); None: every list counts alike.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        gains = gains * valid
    total = gains.sum(-1, keepdim=True)
    has_gain = total.squeeze(-1) > 0
    if not bool(has_gain.any()):
        return scores.sum() * 0.0
    target = gains[has_gain] / total[has_gain]
    log_p = torch.log_softmax(scores[has_gain], dim=-1)
    log_p = torch.where(target > 0, log_p, torch.zeros_like(log_p))
    per_list = -(target * log_p).sum(-1)
    if list_weight is None:
        return per_list.mean()
    w = list_weight[has_gain]
    return (w * per_list).sum() / w.sum().clamp(min=1e-12)
