"""The model versions as the registry records them: lineage, gate figures, which one serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import registry as reg


@dataclass(frozen=True)
class Version:
    name: str
    status: str  # serving, promoted, rejected, rolled back, published (core.registry.statuses)
    created_at: str
    trained_by: str
    parent: str | None
    lineage: list[str]
    metrics: dict[str, float]
    gate: dict[str, Any] | None  # the continuous trainer's gate (trainer.gate.GateResult.to_dict)
    reason: str | None  # the latest reason the log gives for it
    error: str | None = None

    @property
    def quality(self) -> float | None:
        """MAP@5: on the gate's holdout for a continuous version, else the training evaluation's."""
        return self.metrics.get("holdout_map@5", self.metrics.get("map@5"))


@dataclass(frozen=True)
class Registry:
    path: Path
    serving: str | None
    versions: list[Version]  # newest first
    log: list[dict[str, Any]] = field(default_factory=list)  # newest first

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.versions:
            out[v.status] = out.get(v.status, 0) + 1
        return out


def read(path: Path, log_entries: int = 30) -> Registry:
    """What ``shoprank model list`` shows, plus the gate figures and the latest log entries."""
    entries = reg.history(path)
    status = reg.statuses(path, entries)
    why: dict[str, str] = {}
    for e in entries:
        if e.get("reason"):
            why[e["version"]] = e["reason"]
    manifests: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name in reg.list_versions(path):
        try:
            manifests[name] = json.loads((path / name / reg.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            manifests[name], errors[name] = {}, f"unreadable manifest: {exc}"
    parents = {name: m.get("parent_version") for name, m in manifests.items()}
    versions = []
    for name, manifest in manifests.items():
        versions.append(Version(
            name=name, status=status.get(name, "?"), created_at=(manifest.get("created_at") or "")[:19],
            trained_by=manifest.get("trained_by", "train"), parent=parents[name],
            lineage=_lineage(name, parents), metrics=manifest.get("metrics") or {},
            gate=manifest.get("gate"), reason=why.get(name), error=errors.get(name)))
    versions.sort(key=lambda v: v.created_at, reverse=True)
    return Registry(path, reg.serving_version(path), versions, list(reversed(entries))[:log_entries])


def _lineage(version: str, parents: dict[str, str | None]) -> list[str]:
    """core.registry.lineage over manifests already read: each version's chain would otherwise
    read every ancestor's manifest again (a continuous trainer's registry holds hundreds)."""
    chain: list[str] = []
    current: str | None = version
    while current and current not in chain:
        chain.append(current)
        current = parents.get(current)
    return chain
