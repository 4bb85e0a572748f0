"""Tiny model versions for tests: the real training pipeline on a slice of Best Buy, with a small
random BERT (the real tokenizer), in seconds."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from core.registry import ModelVersion
from core.settings import ModelSettings, Settings
from evaluation.splits import BestBuySplit, bestbuy_split
from trainer.pipeline import TrainRun, train_run, write_version

SLICE = 1500


@cache
def split() -> BestBuySplit:
    return bestbuy_split(Settings().data_dir)


@cache
def tiny_run(seed: int = 13) -> TrainRun:
    settings = Settings(model=ModelSettings(epochs=1, batch_size=64, negatives=15, seed=seed))
    s = split()
    return train_run(settings, s.train[:SLICE], s.catalog, personalized=True, progress=False, tiny=True)


def tiny_version(registry: Path, name: str, seed: int = 13) -> ModelVersion:
    return write_version(registry, tiny_run(seed), metrics={"map@5": 0.5}, parent=None, name=name)
