"""Nexus: upcycle dense expert LMs into an extensible Mixture-of-Experts (arXiv 2408.15901).

    import nexus
    moe = nexus.upcycle(seed, [expert_a, expert_b], domain_embeddings=D, router="nexus")

Names are imported on first use, so `import nexus` (and the `nexus` CLI) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "nexus.config",
    "MoEConfig": "nexus.config",
    "Transformer": "nexus.model",
    "parameter_counts": "nexus.model",
    "load_checkpoint": "nexus.checkpoint",
    "save_checkpoint": "nexus.checkpoint",
    "upcycle": "nexus.upcycling",
    "merge_dense": "nexus.upcycling",
    "sparse_upcycle": "nexus.upcycling",
    "extend": "nexus.upcycling",
    "remove_expert": "nexus.upcycling",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nexus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
