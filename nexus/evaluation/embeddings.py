"""Embedding geometry (the paper's Figure 8): cosine similarities between the domain embeddings
`d_i` and between the expert embeddings `e_i = P_r(d_i)` the Nexus router projects them to.

The paper's finding to check: the projection keeps the relative similarities of the domains
(e.g. code-like domains stay close) while pushing experts further apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nexus.data.embeddings import cosine_similarity
from nexus.model.moe import MoELayer
from nexus.model.transformer import Transformer


@dataclass
class EmbeddingGeometry:
    """(n, n) cosine similarities of domain embeddings and of one block's expert embeddings."""

    names: list[str]
    domain_similarity: np.ndarray
    expert_similarity: np.ndarray
    layer: int

    def mean_off_diagonal(self) -> dict[str, float]:
        """Average similarity between different domains / experts (lower = further apart)."""
        off = ~np.eye(len(self.names), dtype=bool)
        return {
            "domain": float(self.domain_similarity[off].mean()) if off.any() else float("nan"),
            "expert": float(self.expert_similarity[off].mean()) if off.any() else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "domain_similarity": self.domain_similarity.tolist(),
            "expert_similarity": self.expert_similarity.tolist(),
            "layer": self.layer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbeddingGeometry:
        return cls(
            list(data["names"]),
            np.asarray(data["domain_similarity"]),
            np.asarray(data["expert_similarity"]),
            int(data["layer"]),
        )


@torch.no_grad()
def embedding_geometry(model: Transformer, layer: int = -1) -> EmbeddingGeometry:
    """Geometry of a Nexus-router MoE: its `domain_embeddings` buffer and block `layer`'s projected
    expert embeddings (default the last block, as in the paper)."""
    if model.config.moe is None or model.domain_embeddings is None:
        raise ValueError("embedding geometry needs an MoE with the Nexus router (domain embeddings)")
    layer = layer % model.config.n_layers
    ffn = model.blocks[layer].ffn
    assert isinstance(ffn, MoELayer)
    domains = model.domain_embeddings.float()
    experts = ffn.router(model.domain_embeddings).float()  # E = [e_1 … e_n], from the domain embeddings
    return EmbeddingGeometry(
        list(model.config.moe.expert_names),
        cosine_similarity(domains.cpu().numpy()),
        cosine_similarity(experts.cpu().numpy()),
        layer,
    )
