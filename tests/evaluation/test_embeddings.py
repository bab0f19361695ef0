"""Embedding geometry: cosine similarities of domain and projected expert embeddings."""

import numpy as np
import pytest
import torch

from nexus.config import tiny
from nexus.evaluation.embeddings import EmbeddingGeometry, embedding_geometry
from nexus.model.transformer import Transformer


def test_geometry_of_known_embeddings():
    model = Transformer(tiny(moe={"expert_names": ["a", "b", "c"], "domain_embed_dim": 4}))
    model.domain_embeddings.copy_(torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0]]))
    geometry = embedding_geometry(model)
    assert geometry.layer == 1 and geometry.names == ["a", "b", "c"]
    np.testing.assert_allclose(
        geometry.domain_similarity, [[1, 2**-0.5, 0], [2**-0.5, 1, 0], [0, 0, 1]], atol=1e-6
    )
    e = model.blocks[1].ffn.router.expert_embeddings(model.domain_embeddings).detach()
    expected = torch.nn.functional.cosine_similarity(e[:, None], e[None], dim=-1).numpy()
    np.testing.assert_allclose(geometry.expert_similarity, expected, atol=1e-5)
    assert not np.allclose(embedding_geometry(model, layer=0).expert_similarity, expected)  # per block
    off = geometry.mean_off_diagonal()
    assert off["domain"] == pytest.approx((2 * 2**-0.5) / 6)
    again = EmbeddingGeometry.from_dict(geometry.to_dict())
    np.testing.assert_array_equal(again.expert_similarity, geometry.expert_similarity)


def test_linear_router_has_no_domain_embeddings():
    with pytest.raises(ValueError, match="Nexus router"):
        embedding_geometry(Transformer(tiny(moe={"expert_names": ["a", "b"], "router": "linear"})))
