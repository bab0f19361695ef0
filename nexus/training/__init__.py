"""Training: one LightningModule and DataModule for every stage, and the stage functions flows call.

Names are imported on first use, so reading a `TrainConfig` (e.g. composing a config in the CLI)
does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "nexus.training.config",
    "MixtureDataModule": "nexus.training.datamodule",
    "CausalLMModule": "nexus.training.module",
    "StageResult": "nexus.training.stages",
    "train_dense": "nexus.training.stages",
    "train_moe": "nexus.training.stages",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nexus.training' has no attribute {name!r}")
