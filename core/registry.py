"""The model registry: one folder per model version, written whole or not at all.

Layout under ``Settings.model.registry_dir``::

    <version>/manifest.json   version, parent, data window, metrics, config, sha256 of every file
    <version>/model.onnx      the ranker graph (see trainer.export)
    <version>/...             product embeddings, product ids, tokenizer, torch weights
    SERVING                   the name of the version every scorer should serve

A version folder is assembled under a temporary name and renamed into place (atomic on one
file system), so a reader sees either no version or a complete one. Readers verify every file's
hash before trusting it. No torch here: the scorer uses this module too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.pretrained import sha256_file

MANIFEST = "manifest.json"
SERVING = "SERVING"


class RegistryError(RuntimeError):
    """A version is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_version(registry: Path, version: str, manifest: dict[str, Any],
                    write_files: Callable[[Path], None]) -> ModelVersion:
    """Write a version atomically: ``write_files(tmp_dir)`` fills it, then hashes, manifest, rename."""
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / version
    if final.exists():
        raise RegistryError(f"version {version} already exists in {registry}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=registry))
    try:
        write_files(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        body = {**manifest, "version": version, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        _fsync_dir(registry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_version(registry, version)


def load_version(registry: Path, version: str) -> ModelVersion:
    """A version whose files all match the hashes in its manifest, or :class:`RegistryError`."""
    path = registry / version
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RegistryError(f"version {version}: no {MANIFEST} in {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {version}: unreadable manifest: {exc}") from None
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise RegistryError(f"version {version}: file {name} is missing")
        if sha256_file(file) != expected:
            raise RegistryError(f"version {version}: file {name} does not match its sha256")
    return ModelVersion(version, path, manifest)


def set_serving(registry: Path, version: str) -> None:
    """Point SERVING at ``version`` (atomic replace)."""
    load_version(registry, version)
    tmp = registry / f".{SERVING}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, registry / SERVING)


def serving_version(registry: Path) -> str | None:
    path = registry / SERVING
    return path.read_text().strip() if path.is_file() else None


def list_versions(registry: Path) -> list[str]:
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
