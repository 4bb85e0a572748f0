"""A version for a shop with no data yet: rank by text match from the first query.

The pretrained encoder is both the query tower and the product tower, and the ranking head's
MLP output is zeroed, so a candidate's score is ``text_scale * cos(query, product)`` alone (see
:class:`trainer.model.RankingHead`): exactly the pretrained encoder's ranking, whatever the
features read (a new shop's features are mostly zeros anyway). It is a complete version (graphs,
tokenizer, torch weights), so the continuous trainer fine-tunes from it like from any other, and
its product tower is the one every version trained from the pretrained encoder ships: their
embeddings in Redis are shared.

The product table it ships may be empty: the catalog's products are embedded into Redis
(:func:`scorer.embedder.embed_catalog`, ``shoprank embedder``), where scorers read them.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
import torch
from tokenizers import Tokenizer

from core.events import CatalogProduct
from core.layout import PRODUCT_MAX_LEN
from core.pretrained import minilm_path
from core.registry import ModelVersion, publish_version
from core.settings import FeatureSettings
from core.text import product_text
from features.read import FEATURE_NAMES
from trainer.export import write_version_files
from trainer.model import PersonalRanker, QueryTower, RankerConfig, encoder_config_of, load_encoder
from trainer.pipeline import EXPORT_TOLERANCE, TINY_ENCODER, USER_FEATURES
from trainer.products import embed_texts

log = structlog.get_logger(__name__)


def zero_shot_model(tiny: bool = False, seed: int = 13,
                    train_layers: int = 2) -> tuple[PersonalRanker, QueryTower]:
    """The ranker whose score is the text match alone, and its product tower (the same encoder,
    copied before any fine-tuning can touch it). ``tiny``: a small random BERT (tests)."""
    path = minilm_path()
    encoder = encoder_config_of(path)
    if tiny:
        encoder = {**encoder, **TINY_ENCODER}
    cfg = RankerConfig(feature_names=FEATURE_NAMES, user_feature_names=USER_FEATURES, personalized=True,
                       encoder=encoder, dim=encoder["hidden_size"], train_layers=train_layers)
    torch.manual_seed(seed)
    model = PersonalRanker(cfg, load_encoder(None if tiny else path, encoder))
    last = model.head.mlp[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():  # the MLP's output is 0: score = text_scale * text_sim
        last.weight.zero_()
        last.bias.zero_()
    return model, copy.deepcopy(model.query)


def zero_shot_version(registry: Path, name: str | None = None, products: Iterable[CatalogProduct] = (),
                      tiny: bool = False, seed: int = 13, features: FeatureSettings | None = None,
                      parent: str | None = None) -> ModelVersion:
    """Publish a zero-shot version in ``registry`` (not serving yet: the caller promotes it, after
    :func:`scorer.embedder.embed_catalog` has embedded the live catalog for its tower).

    ``products``: shipped in its table (embedded here with torch); usually none, the catalog's
    vectors live in Redis.
    """
    model, tower = zero_shot_model(tiny=tiny, seed=seed)
    shipped = list({p.product_id: p for p in products}.values())
    tokenizer_path = minilm_path() / "tokenizer.json"
    ids = [p.product_id for p in shipped]
    if shipped:
        emb = embed_texts(tower, Tokenizer.from_file(str(tokenizer_path)), [product_text(p) for p in shipped],
                          progress=False)
    else:
        emb = np.zeros((0, model.cfg.dim), np.float32)
    name = name or datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-zeroshot"
    manifest = {
        "parent_version": parent,
        "created_at": datetime.now(UTC).isoformat(),
        "trained_by": "zero_shot",
        "data_window": {"from": None, "to": None, "rows": 0},
        "metrics": {},
        "training": {"best_epoch": 0, "refit_epochs": 0, "seconds": 0.0, "stopped": "zero_shot",
                     "history": []},
        "config": model.cfg.to_dict(),
        "product_tower": {"max_len": PRODUCT_MAX_LEN},
        "feature_mean": model.head.mean.tolist(),
        "features_used": list(model.cfg.feature_names),
        "features": (features or FeatureSettings()).model_dump(),
        "host": platform.node(),
    }
    version = publish_version(registry, name, manifest, lambda folder: write_version_files(
        folder, model, tower, ids, emb, tokenizer_path, EXPORT_TOLERANCE))
    log.info("zero_shot_version", model_version=version.version, products=len(ids), tiny=tiny)
    return version
