"""Hot-swap: load and warm a new model version beside the one serving, then switch between batches.

The scoring loop reads :attr:`ModelHolder.current` once per batch, so a batch is scored by one
version from start to end and no query is dropped by a swap. A version that fails to load, to
match its announced manifest hash, or to score its warm-up batch never replaces the one serving.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import structlog

from core import kafka
from core.events import MODEL_UPDATES, InvalidEvent, ModelUpdate
from core.registry import RegistryError, sha256_file
from core.settings import Settings
from scorer.metrics import ScorerMetrics
from scorer.runtime import ServedModel, load_served_model

log = structlog.get_logger(__name__)


class ModelHolder:
    """The version serving now; swapped whole, never mutated."""

    def __init__(self, model: ServedModel, registry: Path, device: str, metrics: ScorerMetrics) -> None:
        self._model = model
        self._registry = registry
        self._device = device
        self._metrics = metrics
        self._lock = threading.Lock()
        metrics.serving(model.version)

    @property
    def current(self) -> ServedModel:
        return self._model

    def swap(self, update: ModelUpdate) -> bool:
        """Serve ``update``'s version if it loads, matches and warms up; otherwise keep the old one."""
        with self._lock:
            if update.model_version == self._model.version:
                return True
            registry = Path(update.uri).parent if update.uri else self._registry
            try:
                manifest = Path(update.uri) / "manifest.json"
                if not manifest.is_file() or sha256_file(manifest) != update.manifest_sha256:
                    raise RegistryError(f"manifest of {update.model_version} does not match the announcement")
                new = load_served_model(registry, update.model_version, device=self._device)
            except Exception as exc:  # a bad model must never stop the scorer
                self._metrics.swaps.labels(outcome="rejected").inc()
                log.error("model_swap_rejected", model_version=update.model_version,
                          serving=self._model.version, reason=str(exc))
                return False
            old, self._model = self._model, new
            self._metrics.swaps.labels(outcome="swapped").inc()
            self._metrics.serving(new.version)
            log.info("model_swapped", model_version=new.version, previous=old.version, device=new.device)
            return True


class UpdateListener(threading.Thread):
    """Follows the model-updates topic (every scorer sees every update) and swaps as they come."""

    def __init__(self, settings: Settings, holder: ModelHolder) -> None:
        super().__init__(name="model-updates", daemon=True)
        self._settings = settings
        self._holder = holder
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        group = f"shoprank-scorer-updates-{uuid.uuid4().hex[:8]}"
        consumer = kafka.consumer(self._settings, group_id=group, **{"auto.offset.reset": "latest"})
        consumer.subscribe([self._settings.topics.model_updates])
        try:
            while not self._stopping.is_set():
                msg = consumer.poll(0.5)
                if msg is None or msg.error() is not None:
                    continue
                try:
                    update = MODEL_UPDATES.decode(msg.value())
                except InvalidEvent as exc:
                    log.error("model_update_invalid", reason=exc.reason, offset=msg.offset())
                    continue
                self._holder.swap(update)
        finally:
            consumer.close()
