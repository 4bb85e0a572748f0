"""The model registry: one folder per model version, written whole or not at all.

Layout under ``Settings.model.registry_dir``::

    <version>/manifest.json   version, parent, data window, metrics, config, sha256 of every file
    <version>/model.onnx      the ranker graph (see trainer.export)
    <version>/...             product embeddings, product ids, tokenizer, torch weights
    SERVING                   the name of the version every scorer should serve
    LOG.jsonl                 append-only: each version's fate (promoted, rejected, rolled back),
                              who decided and why; not covered by any manifest's hashes

A version folder is assembled under a temporary name and renamed into place (atomic on one
file system), so a reader sees either no version or a complete one. Readers verify every file's
hash before trusting it. No torch here: the scorer uses this module too.

Announcements name a version by reference (``registry:<version>``), never by path: every scorer
resolves it under its own ``Settings.model.registry_dir``, so scorers on other machines (with
the registry mounted elsewhere, or synced) load the same version.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.pretrained import sha256_file

MANIFEST = "manifest.json"
SERVING = "SERVING"
LOG = "LOG.jsonl"
URI_SCHEME = "registry:"

# What the log says happened to a version (``event``); ``status`` reads the latest of them.
PUBLISHED, PROMOTED, REJECTED, ROLLED_BACK, ROLLBACK_TO = (
    "published", "promoted", "rejected", "rolled_back", "rollback_to")


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


def load_version(registry: Path, version: str, files: Iterable[str] | None = None,
                 optional: Iterable[str] = ()) -> ModelVersion:
    """A version whose files all match the hashes in its manifest, or :class:`RegistryError`.
    ``files``: verify only these (each must be in the manifest): what a reader reads, e.g. a
    scorer, which never reads the torch weights or the product tower (180 of 270 MB);
    ``optional``: with ``files``, verify these too where the manifest lists them (files that
    versions written before them lack)."""
    path = registry / version
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RegistryError(f"version {version}: no {MANIFEST} in {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {version}: unreadable manifest: {exc}") from None
    listed = manifest.get("files", {})
    if files is not None:
        wanted = list(files) + [name for name in optional if name in listed]
        unlisted = sorted(set(wanted) - set(listed))
        if unlisted:
            raise RegistryError(f"version {version}: {', '.join(unlisted)} not in its manifest")
        listed = {name: listed[name] for name in wanted}
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            raise RegistryError(f"version {version}: file {name} is missing")
        if sha256_file(file) != expected:
            raise RegistryError(f"version {version}: file {name} does not match its sha256")
    return ModelVersion(version, path, manifest)


def set_serving(registry: Path, version: str, event: str = PROMOTED, reason: str | None = None,
                **fields: Any) -> None:
    """Point SERVING at ``version`` (atomic replace) and log it (``event``: promoted, or
    rollback_to when an older version comes back), with the version it replaces."""
    load_version(registry, version)
    previous = serving_version(registry)
    tmp = registry / f".{SERVING}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, registry / SERVING)
    record(registry, version, event, reason=reason, previous=previous, **fields)


def serving_version(registry: Path) -> str | None:
    path = registry / SERVING
    return path.read_text().strip() if path.is_file() else None


def list_versions(registry: Path) -> list[str]:
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


# --- references, the log, status and lineage ---------------------------------------------------


def uri(version: str) -> str:
    """The location-independent reference an announcement carries."""
    return URI_SCHEME + version


def version_of_uri(reference: str) -> str:
    """The version a reference names: ``registry:<version>``, or (announcements from before
    references) the last component of an absolute path to the version folder."""
    if reference.startswith(URI_SCHEME):
        name = reference[len(URI_SCHEME):]
    else:
        name = Path(reference.rstrip("/")).name
    if not name or name in {".", ".."} or "/" in name:
        raise RegistryError(f"{reference!r} names no model version")
    return name


def record(registry: Path, version: str, event: str, reason: str | None = None, **fields: Any) -> dict:
    """Append one line to the registry log: what happened to ``version``, when, where, why.

    One ``write`` of one line on a file opened for appending: lines from several writers never
    interleave on a local file system. Returns the entry.
    """
    registry.mkdir(parents=True, exist_ok=True)
    entry = {"at": datetime.now(UTC).isoformat(), "version": version, "event": event,
             **({"reason": reason} if reason else {}),
             **{k: v for k, v in fields.items() if v is not None}, "host": platform.node(),
             "pid": os.getpid()}
    fd = os.open(registry / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def history(registry: Path) -> list[dict[str, Any]]:
    """Every log entry, oldest first (a torn last line from a crash is skipped)."""
    path = registry / LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def statuses(registry: Path, entries: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """Each version's status: ``serving``; else ``rolled back`` (it served and was rolled back),
    ``promoted`` (it served, then a newer one did), ``rejected`` (the gate or a comparison kept
    it out), or ``published`` (never judged)."""
    entries = history(registry) if entries is None else entries
    out = dict.fromkeys(list_versions(registry), "published")
    for e in entries:
        v, event = e.get("version"), e.get("event")
        if v not in out:
            continue
        if event in (PROMOTED, ROLLBACK_TO):
            out[v] = "promoted"
        elif event == REJECTED and out[v] == "published":
            out[v] = "rejected"
        elif event == ROLLED_BACK:
            out[v] = "rolled back"
    current = serving_version(registry)
    if current in out:
        out[current] = "serving"
    return out


def previous_serving(registry: Path, entries: list[dict[str, Any]] | None = None) -> str | None:
    """The version that served before the one serving now (the log's ``previous`` of the latest
    change to it), or None when the log does not say."""
    current = serving_version(registry)
    entries = history(registry) if entries is None else entries
    for e in reversed(entries):
        if e.get("version") == current and e.get("event") in (PROMOTED, ROLLBACK_TO):
            return e.get("previous")
    return None


def lineage(registry: Path, version: str) -> list[str]:
    """``version``, its parent, the parent's parent... as far as manifests say (cycles cut)."""
    chain: list[str] = []
    current: str | None = version
    while current and current not in chain:
        chain.append(current)
        path = registry / current / MANIFEST
        if not path.is_file():
            break
        try:
            current = json.loads(path.read_text()).get("parent_version")
        except json.JSONDecodeError:
            break
    return chain
