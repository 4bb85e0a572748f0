"""Hot-swap: load and warm a new model version beside the one serving, then switch between batches.

The scoring loop reads :attr:`ModelHolder.current` once per batch, so a batch is scored by one
version from start to end and no query is dropped by a swap. A version that fails to load, to
match its announced manifest hash, or to score its warm-up batch never replaces the one serving.

Where a version lives is this scorer's own setting (``Settings.model.registry_dir``): an
announcement names the version (``registry:<version>``), never a path, so every scorer resolves
it the same way wherever the registry is mounted. Announcements from before references carried
the folder's absolute path: only its last component, the version name, is taken from it.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from pathlib import Path

import structlog

from core import kafka
from core.events import MODEL_UPDATES, InvalidEvent, ModelUpdate
from core.registry import MANIFEST, RegistryError, sha256_file, version_of_uri
from core.settings import Settings
from scorer.metrics import ScorerMetrics
from scorer.runtime import ServedModel, load_served_model, release_memory

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
            retired: weakref.ref[ServedModel] | None = None
            try:
                named = version_of_uri(update.uri)
                if named != update.model_version:
                    raise RegistryError(f"the announcement's uri {update.uri!r} names {named}, "
                                        f"not {update.model_version}")
                manifest = self._registry / update.model_version / MANIFEST
                if not manifest.is_file():
                    raise RegistryError(f"{update.model_version} is not in the registry {self._registry}")
                if sha256_file(manifest) != update.manifest_sha256:
                    raise RegistryError(f"manifest of {update.model_version} does not match the announcement")
                new = load_served_model(self._registry, update.model_version, device=self._device,
                                        threads=self._model.threads,
                                        embeddings=self._model.embedding_source)  # Redis vectors too
            except Exception as exc:  # a bad model must never stop the scorer
                self._metrics.swaps.labels(outcome="rejected").inc()
                log.error("model_swap_rejected", model_version=update.model_version,
                          serving=self._model.version, reason=str(exc))
                swapped = False
            else:
                cached = new.adopt_query_cache(self._model)  # before it serves: no query waits on it
                old, self._model = self._model, new
                self._metrics.swaps.labels(outcome="swapped").inc()
                self._metrics.serving(new.version)
                log.info("model_swapped", model_version=new.version, previous=old.version, device=new.device,
                         query_cache=cached)
                swapped, retired = True, weakref.ref(old)
                del old, new  # the batch in progress, if any, holds the old version until it ends
        # What the old version (or a refused one, half loaded) held goes back to the OS, here on
        # the listener's thread: RSS stays flat over hundreds of swaps (make bench-swap).
        release_memory(retired)
        return swapped


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
