"""What a saved plan is bound to: the model's content (its config and a fingerprint of its weights), not the
path it was loaded from. No torch here: the fingerprint reads config.json, each weight file's size and
safetensors header, and its first and last MiB, so a plan is checked in milliseconds even for a 70B model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BYTES = 2**20
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")  # where it was saved from, and by what


def model_content(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """`{"config": sha256, "weights": sha256}` of a local model directory; None for a hub name or no model."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    weights = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES and file.is_file():
            weights.update(_file_digest(file).encode())
    return {"config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32],
            "weights": weights.hexdigest()[:32]}


def _file_digest(file: Path) -> str:
    """Name, size, and the first and last MiB (a safetensors header, with every shape, is in the first)."""
    size = file.stat().st_size
    digest = hashlib.sha256(f"{file.name}:{size}".encode())
    with file.open("rb") as f:
        digest.update(f.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()
