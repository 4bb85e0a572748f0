"""One training run on Best Buy: point-in-time lists, fine-tuning, ONNX export, a model version.

``train_run`` builds everything in memory and returns it; ``write_version`` writes a version
folder (atomically, via core.registry) whose graphs, product embeddings and tokenizer are what
the scorer serves.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
from core.settings import Settings
from core.text import normalize_query, product_text, words
from evaluation.ranker import SearchRow
from features.memory import MemoryStore
from features.read import FEATURE_NAMES
from scorer.runtime import head_queries
from trainer.examples import TRAIN, VALIDATE, Catalog, ListBuilder, build_lists
from trainer.export import write_version_files
from trainer.fit import FitConfig, FitResult, fit
from trainer.model import PersonalRanker, QueryTower, RankerConfig, encoder_config_of, load_encoder
from trainer.products import embed_texts

log = structlog.get_logger(__name__)

USER_FEATURES = (
    "user_category_affinity", "user_brand_affinity", "price_ratio_log", "price_level_cross",
    "user_activity_log", "user_searches_log", "hours_since_seen_log", "user_has_history",
    "user_item_interest",
    # Where and on what the shopper searches is theirs too: a non-personal ranking ignores it.
    "context_location_lift", "context_location_clicks_log", "context_device_lift",
    "context_device_clicks_log",
)
VALIDATION_FRACTION = 0.1
EXPORT_TOLERANCE = 1e-3


@dataclass
class TrainRun:
    model: PersonalRanker
    tokenizer: Tokenizer
    catalog: Catalog
    store: MemoryStore  # the features as of the end of the training rows
    result: FitResult
    window: tuple[datetime, datetime]
    n_rows: int
    # The encoder that embedded ``catalog`` (as it was then), or a parent version's
    # product_encoder.onnx (same tower: same vectors in Redis); shipped as the version's product
    # tower. None: the pretrained encoder when the model's encoder has its shape, else no tower.
    product_tower: QueryTower | Path | None = None
    # The encoder keys of its most frequent training queries, shipped with their embeddings
    # (scorer.runtime.QueryTable): a scorer never encodes them.
    queries: Sequence[str] = ()
    encoder_precision: str = "fp32"  # the query encoder it asks to serve (trainer.export)


def fit_config(settings: Settings, progress: bool = True) -> FitConfig:
    m = settings.model
    return FitConfig(epochs=m.epochs, batch_size=m.batch_size, learning_rate=m.learning_rate,
                     encoder_learning_rate=m.encoder_learning_rate, patience=m.patience,
                     max_minutes=m.max_minutes, seed=m.seed, progress=progress, decay=True)


TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def train_run(settings: Settings, rows: Sequence[SearchRow], products: Mapping[str, CatalogProduct],
              personalized: bool = True, progress: bool = True, tiny: bool = False) -> TrainRun:
    """Fine-tune a ranker on ``rows`` (time ordered); the last 10% of searches validate it.

    ``tiny`` swaps the pretrained encoder for a small random BERT (same tokenizer): the whole
    pipeline in seconds, for tests.
    """
    path = minilm_path()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    encoder = encoder_config_of(path)
    if tiny:
        encoder = {**encoder, **TINY_ENCODER}
    cfg = RankerConfig(feature_names=FEATURE_NAMES, user_feature_names=USER_FEATURES,
                       personalized=personalized, encoder=encoder, dim=encoder["hidden_size"],
                       train_layers=settings.model.train_layers)

    def fresh_model() -> PersonalRanker:  # seeded: the refit starts where the first fit started
        torch.manual_seed(settings.model.seed)
        return PersonalRanker(cfg, load_encoder(None if tiny else path, encoder))

    model = fresh_model()
    tower = copy.deepcopy(model.query)  # the product tower: these weights embed the catalog
    ids = list(products)
    catalog = Catalog(ids, embed_texts(model.query, tokenizer, [product_text(products[p]) for p in ids],
                                       progress=progress))
    # One vector per query key (the candidates' nearest products), embedded from the first way the
    # key was typed: the key itself (sorted, unspaced words) is no text a model can read.
    typed: dict[str, str] = {}
    for r in rows:
        typed.setdefault(normalize_query(r.query), " ".join(words(r.query)))
    keys = sorted(typed)
    vectors = dict(zip(keys, embed_texts(model.query, tokenizer, [typed[k] for k in keys],
                                         max_len=cfg.max_query_len, progress=progress), strict=True))
    times = sorted(r.query_time for r in rows if r.query_time)
    val_from = times[int(len(times) * (1 - VALIDATION_FRACTION))]
    store = MemoryStore(settings.features)
    for product in products.values():  # the catalog first: clicks on unknown products are rejected
        store.apply(product)
    width = settings.model.negatives + 1
    builder = ListBuilder(catalog, vectors, width, cfg.history_len, settings.model.seed)
    started = time.monotonic()
    lists, roles = build_lists(rows, store, builder, full_from=val_from, progress=progress)
    train = lists.subset(np.flatnonzero(roles == TRAIN)).narrowed(width)
    val = lists.subset(np.flatnonzero(roles == VALIDATE))
    log.info("training_lists", train=len(train), val=len(val), seconds=round(time.monotonic() - started, 1))
    config = fit_config(settings, progress)
    result = fit(model, tokenizer, catalog.table(), train, val, config)
    if settings.model.refit and result.best_epoch > 0:
        # The validation period is the freshest evidence, and what comes right after it is what
        # the model will rank: a fresh model fits the whole period for the epochs validation chose.
        model = fresh_model()
        whole = lists.subset(np.flatnonzero(roles != VALIDATE)).narrowed(width)
        log.info("refit", lists=len(whole), epochs=result.best_epoch)
        refit = fit(model, tokenizer, catalog.table(), whole, None,
                    replace(config, epochs=result.best_epoch, schedule_epochs=config.epochs))
        result.seconds += refit.seconds
        result.refit_epochs = result.best_epoch
    queries = head_queries(tokenizer, (r.query for r in rows), settings.model.shipped_queries)
    return TrainRun(model, tokenizer, catalog, store, result, (times[0], times[-1]), len(rows), tower,
                    queries, settings.model.query_encoder_precision)


def _pretrained_shape(encoder: dict) -> bool:
    """Whether an encoder config is the pretrained encoder's (not a tiny test BERT)."""
    shape = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    pretrained = encoder_config_of(minilm_path())
    return all(encoder.get(k) == pretrained.get(k) for k in shape)


def version_name(run: TrainRun) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{'p' if run.model.cfg.personalized else 'np'}-{run.result.best_metric:.4f}"


def write_version(registry: Path, run: TrainRun, metrics: dict[str, float], parent: str | None,
                  name: str | None = None) -> ModelVersion:
    """Export the graphs, check them against torch, and publish the version folder whole."""

    def write(folder: Path) -> None:
        tower = run.product_tower
        if tower is None and _pretrained_shape(run.model.cfg.encoder):
            tower = QueryTower(load_encoder(minilm_path()))  # products embedded by the pretrained encoder
        elif tower is None:
            log.warning("version_without_product_tower", reason="the run names no product tower")
        manifest["query_encoder"] = write_version_files(
            folder, run.model, tower, run.catalog.product_ids, run.catalog.embeddings,
            minilm_path() / "tokenizer.json", EXPORT_TOLERANCE, run.queries, run.encoder_precision)

    manifest: dict[str, object] = {  # write() adds what it made of the query encoder
        "parent_version": parent,
        "created_at": datetime.now(UTC).isoformat(),
        "data_window": {"from": run.window[0].isoformat(), "to": run.window[1].isoformat(),
                        "rows": run.n_rows},
        "metrics": metrics,
        "training": {"best_epoch": run.result.best_epoch, "val_map5": run.result.best_metric,
                     "refit_epochs": run.result.refit_epochs,
                     "seconds": round(run.result.seconds, 1), "stopped": run.result.stopped,
                     "history": run.result.history},
        "config": run.model.cfg.to_dict(),
        "product_tower": {"max_len": PRODUCT_MAX_LEN},
        "feature_mean": run.model.head.mean.tolist(),  # the explain API's reference point
        "features_used": [n for n, k in zip(run.model.cfg.feature_names, run.model.head.keep.tolist(),
                                            strict=True) if k],
        "features": run.store.config.model_dump(),
        "host": platform.node(),
    }
    return publish_version(registry, name or version_name(run), manifest, write)
