"""The quality report: a markdown table, and ``bench/results/quality.json`` merged across runs.

The JSON holds ``{"entries": [...]}``, one entry per (method, dataset) with its metrics, their
spread over folds where there are folds, the number of queries, the protocol and when it was
measured. :func:`write_rows` replaces the entries it is given and keeps every other one, so each
method (a baseline here, the BERT ranker elsewhere) can add or refresh its own rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from core.settings import ROOT

if TYPE_CHECKING:
    from evaluation.harness import Result

QUALITY_JSON: Final = ROOT / "bench" / "results" / "quality.json"
COLUMNS: Final = ("map@5", "ndcg@10", "mrr", "recall@10", "recall@50")


def entry(result: Result) -> dict[str, Any]:
    """A result as a JSON entry, stamped with the time it was written."""
    data = dataclasses.asdict(result)
    data["metrics"] = {k: round(v, 6) for k, v in result.metrics.items()}
    data["spread"] = {k: round(v, 6) for k, v in result.spread.items()}
    data["seconds"] = round(result.seconds, 2)
    data["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return data


def read_entries(path: Path = QUALITY_JSON) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["entries"])


def write_rows(results: Iterable[Result], path: Path = QUALITY_JSON) -> list[dict[str, Any]]:
    """Merge ``results`` into ``path`` by (method, dataset); return every entry now in the file."""
    merged = {(e["method"], e["dataset"]): e for e in read_entries(path)}
    merged.update({(r.method, r.dataset): entry(r) for r in results})
    entries = [merged[k] for k in sorted(merged, key=lambda k: (k[1], k[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    return entries


def markdown_table(entries: Iterable[dict[str, Any]], columns: Iterable[str] = COLUMNS) -> str:
    """One row per (dataset, method); ``mean ± std`` where the entry has a spread."""
    columns = list(columns)
    lines = [
        "| dataset | method | " + " | ".join(columns) + " | queries |",
        "|---|---|" + "---:|" * len(columns) + "---:|",
    ]
    for e in entries:
        cells = [_cell(e, c) for c in columns]
        lines.append(f"| {e['dataset']} | {e['method']} | " + " | ".join(cells) + f" | {e['n_queries']} |")
    return "\n".join(lines)


def _cell(e: dict[str, Any], column: str) -> str:
    value = e["metrics"].get(column)
    if value is None:
        return "-"
    spread = e.get("spread", {}).get(column)
    return f"{value:.4f} ± {spread:.4f}" if spread is not None else f"{value:.4f}"
