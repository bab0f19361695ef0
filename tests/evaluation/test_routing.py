"""Routing analysis on a hand-built MoE whose Nexus router is forced: the expected shares are exact."""

import numpy as np
import pytest
import torch

from nexus.config import tiny
from nexus.evaluation.routing import RoutingAnalysis, analyze_routing
from nexus.model.transformer import Transformer

EXPERTS = ["a", "b", "c"]


def forced_moe() -> Transformer:
    """Residual stream = token embedding (attention and every FFN output zeroed); token t points
    along axis t % 3; block l's router maps expert i to axis (i + l) % 3 with a huge norm, so a
    token of group g goes to expert (g - l) % 3 with probability exactly 1 (in float32)."""
    model = Transformer(
        tiny(moe={"expert_names": EXPERTS, "router": "nexus", "domain_embed_dim": 3, "router_hidden": 3})
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if hasattr(module, "weight") and module.weight.dim() == 1:
                module.weight.fill_(1.0)  # RMSNorm gains
        model.tok_emb.weight[torch.arange(96), torch.arange(96) % 3] = 1.0
        model.domain_embeddings.copy_(torch.eye(3))
        for layer, block in enumerate(model.blocks):
            proj = block.ffn.router.proj  # P_r(d_i) = W2 · SiLU(10 d_i) ⊙ d_i ≈ 10 · W2[:, i]
            proj.w_in.weight.copy_(torch.cat([10 * torch.eye(3), torch.eye(3)]))
            proj.w_out.weight[(torch.arange(3) + layer) % 3, torch.arange(3)] = 10.0
    return model.eval()


def test_forced_router_shares_are_exact():
    rng = np.random.default_rng(0)

    def group(g, n):
        return 3 * rng.integers(0, 32, n) + g

    mixed = np.empty(101, dtype=np.int64)
    mixed[0::2], mixed[1::2] = group(2, 51), group(0, 50)  # inputs (all but the last): 50 of each
    splits = {"a": group(0, 101), "b": torch.tensor(group(1, 101)), "mixed": mixed}
    result = analyze_routing(forced_moe(), splits, seq_len=16, batch_size=3)  # 7 windows: padding

    assert result.tokens == {"a": 100, "b": 100, "mixed": 100}
    layer0 = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0, 0.5]])  # group g -> expert g
    layer1 = np.array([[0, 0, 1], [1, 0, 0], [0, 0.5, 0.5]])  # group g -> expert g - 1
    np.testing.assert_array_equal(result.top1_share, np.stack([layer0, layer1]))
    np.testing.assert_array_equal(result.mean_prob, result.top1_share)  # one-hot probabilities
    np.testing.assert_array_equal(result.layer_mean(), [[0.5, 0, 0.5], [0.5, 0.5, 0], [0.25, 0.25, 0.5]])
    assert result.own_expert_share() == {"a": 0.5, "b": 0.5}
    assert result.table()[0] == ["domain", *EXPERTS, "tokens"] and result.table()[3] == [
        "mixed",
        0.25,
        0.25,
        0.5,
        100,
    ]
    again = RoutingAnalysis.from_dict(result.to_dict())
    np.testing.assert_array_equal(again.top1_share, result.top1_share)


def test_max_tokens_and_soft_probabilities():
    model = Transformer(tiny(moe={"expert_names": EXPERTS, "router": "linear"})).eval()
    tokens = np.random.default_rng(1).integers(0, 96, 300)
    result = analyze_routing(model, {"x": tokens}, batch_size=4, max_tokens=130)
    assert result.tokens == {"x": 130}
    np.testing.assert_allclose(result.mean_prob.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.top1_share.sum(-1), 1.0)


def test_dense_model_is_rejected():
    with pytest.raises(ValueError, match="MoE"):
        analyze_routing(Transformer(tiny()), {"x": np.arange(10)})
