"""Checkpoints: a directory holding `model.safetensors` and `config.json` (and any extra files, e.g.
`tokenizer.json`).

Saving is atomic: everything is written into a temporary sibling directory that is renamed into
place, so a crash leaves the previous checkpoint or the new one, never a mix. Loading never
unpickles; it validates the config, the tensor names and shapes, and the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nexus.config import ModelConfig
from nexus.errors import CheckpointError, ConfigError
from nexus.io import atomic_directory
from nexus.model.transformer import Transformer

FORMAT = "nexus-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _state_to_save(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same storage as tok_emb.weight
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write `model` to the directory `path` atomically; `metadata` (JSON-able) goes into config.json,
    `extra_files` ({name in checkpoint: source path}) are copied alongside. Returns `path`."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(_state_to_save(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        config = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.config.to_dict(),
            "sha256": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
            "metadata": metadata or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def check_state_shapes(
    found: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    where: str,
    optional: set[str] = frozenset(),
) -> None:
    """Raise `CheckpointError` (prefixed by `where`) naming missing, unexpected or wrongly shaped tensors."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: "
            + "; ".join(
                filter(
                    None,
                    [
                        missing and f"missing tensors {missing[:5]}",
                        unexpected and f"unexpected tensors {unexpected[:5]}",
                        wrong and f"wrong shapes {wrong[:5]}",
                    ],
                )
            )
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a `CheckpointError` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, format-checked config.json of a checkpoint directory."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG})")
    data = read_json(cfg_file)
    if data.get("format") != FORMAT or "model" not in data:
        raise CheckpointError(f"{cfg_file}: not a {FORMAT} config (missing 'format'/'model')")
    if data.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{cfg_file}: checkpoint version {data['version']} is newer than supported ({VERSION})"
        )
    return data


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    cfg_file = Path(path) / CONFIG
    try:
        return ModelConfig.from_dict(read_checkpoint_config(path)["model"], source=f"{cfg_file}: model")
    except ConfigError as err:
        raise CheckpointError(str(err)) from err


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify_checksum: bool = True,
) -> Transformer:
    """Load a checkpoint directory into a `Transformer` (no pickle), validating everything."""
    path = Path(path)
    meta = read_checkpoint_config(path)
    config = load_model_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    expected = meta.get("sha256", {}).get(WEIGHTS)
    if verify_checksum and expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: corrupt (SHA-256 does not match the one in {CONFIG})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({err})") from err

    model = Transformer(config)
    check_state_shapes(state, _state_to_save(model), f"{weights} does not match {path / CONFIG}")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.to(device=device, dtype=dtype)
