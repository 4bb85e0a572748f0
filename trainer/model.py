"""The personalized ranker, R = f(X, Y; θ), read top to bottom: config, towers, head, model.

X is the shopper and their query, Y a candidate product. A BERT-family encoder
(all-MiniLM-L6-v2) embeds the query; products are embedded by the same pretrained encoder once
per model version (``product_emb`` in the version folder), so serving never runs BERT over the
catalog. The shopper's interest is the weighted mean of the embeddings of their recent products.
A small MLP head combines the text match, the interest match and the dense features that
``features.read`` computes (user affinities, item signals, query-product evidence, position).

The forward signature is exactly the ONNX graph's, so what is trained is what is served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel


@dataclass(frozen=True)
class RankerConfig:
    """Everything needed to rebuild the network; stored in every model version's manifest."""

    feature_names: tuple[str, ...]
    user_feature_names: tuple[str, ...] = ()
    personalized: bool = True
    dim: int = 384
    hidden: int = 128
    max_query_len: int = 16
    history_len: int = 10
    train_layers: int = 2  # top encoder layers fine-tuned; lower ones stay as pretrained
    encoder: dict = field(default_factory=dict)  # BertConfig of the encoder (tiny in tests)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankerConfig:
        data = dict(data)
        data["feature_names"] = tuple(data["feature_names"])
        data["user_feature_names"] = tuple(data.get("user_feature_names", ()))
        return cls(**data)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Sentence-transformers pooling: mean of token states where the mask is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class QueryTower(nn.Module):
    """BERT encoder + mean pooling + L2 normalization (all-MiniLM-L6-v2's recipe)."""

    def __init__(self, encoder: BertModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return l2_normalize(mean_pool(hidden, attention_mask))


class RankingHead(nn.Module):
    """Scores every candidate from its text match, interest match and dense features.

    Dense features are standardized inside the graph with the training set's statistics, so
    callers pass the raw values ``features.read`` returns. When the model is not personalized,
    user features and the interest match are multiplied by zero: same graph, no personal signal.
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        n = len(cfg.feature_names)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        user = set(cfg.user_feature_names)
        keep = [0.0 if (not cfg.personalized and name in user) else 1.0 for name in cfg.feature_names]
        self.register_buffer("keep", torch.tensor(keep))
        self.register_buffer("interest_on", torch.tensor(1.0 if cfg.personalized else 0.0))
        self.mlp = nn.Sequential(
            nn.Linear(n + 2, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden // 2), nn.GELU(),
            nn.Linear(cfg.hidden // 2, 1),
        )
        self.text_scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, text_sim: Tensor, interest_sim: Tensor, dense: Tensor) -> Tensor:
        # Clamped: a value far outside what training saw must not swamp every other signal.
        x = ((dense - self.mean) / self.std).clamp(-8.0, 8.0) * self.keep
        sims = torch.stack([text_sim, interest_sim * self.interest_on], dim=-1)
        return self.mlp(torch.cat([x, sims], dim=-1)).squeeze(-1) + self.text_scale * text_sim


class PersonalRanker(nn.Module):
    """The whole model. Inputs and output are the ONNX graph's (see :mod:`trainer.export`).

    input_ids, attention_mask: [B, L] the tokenized query; cand_emb: [B, N, D] the candidates'
    product embeddings; hist_emb: [B, R, D] and hist_w: [B, R] the shopper's recent products and
    their weights (zeros for none); dense: [B, N, F] features in ``feature_names`` order.
    Returns scores [B, N], higher is better.
    """

    def __init__(self, cfg: RankerConfig, encoder: BertModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = QueryTower(encoder)
        self.head = RankingHead(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, cand_emb: Tensor, hist_emb: Tensor,
                hist_w: Tensor, dense: Tensor) -> Tensor:
        return self.rank(self.query(input_ids, attention_mask), cand_emb, hist_emb, hist_w, dense)

    def rank(self, q: Tensor, cand_emb: Tensor, hist_emb: Tensor, hist_w: Tensor, dense: Tensor) -> Tensor:
        """Scores from an already encoded query (training encodes each distinct query once)."""
        interest = l2_normalize((hist_emb * hist_w.unsqueeze(-1)).sum(1))
        # Both similarities as one batched product, [B, 2, D] x [B, D, N]: it exports as one MatMul
        # (two Einsums cost the scorer ~70 us a query in onnxruntime, a tenth of the whole head).
        sims = torch.stack([q, interest], dim=1) @ cand_emb.transpose(1, 2)
        return self.head(sims[:, 0], sims[:, 1], dense)

    def freeze_lower_layers(self) -> None:
        """Fine-tune only the top ``train_layers`` layers: a CPU budget, and less forgetting."""
        enc = self.query.encoder
        for p in enc.embeddings.parameters():
            p.requires_grad = False
        n_layers = len(enc.encoder.layer)
        for i, layer in enumerate(enc.encoder.layer):
            for p in layer.parameters():
                p.requires_grad = i >= n_layers - self.cfg.train_layers


def load_encoder(pretrained_dir: Path | None, encoder_config: dict | None = None) -> BertModel:
    """The pretrained encoder from a local folder, or a random one from a config (tiny tests)."""
    if pretrained_dir is not None:
        return AutoModel.from_pretrained(str(pretrained_dir), local_files_only=True)
    return BertModel(BertConfig(**(encoder_config or {})), add_pooling_layer=False)


def encoder_config_of(pretrained_dir: Path) -> dict:
    return AutoConfig.from_pretrained(str(pretrained_dir), local_files_only=True).to_dict()
