"""Tokenization for training, the same tokenizer.json the scorer serves with (HF tokenizers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer


def token_ids(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Unpadded token ids of each text, truncated to ``max_len``."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_len)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(list(texts))]


def pad(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask, padded to the longest sequence (dynamic padding)."""
    length = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), length), dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
