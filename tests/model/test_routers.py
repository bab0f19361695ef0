"""Routers: the Nexus projection equation, precomputation, and independence from n_experts."""

import torch

from nexus.config import tiny
from nexus.model.ffn import swiglu
from nexus.model.routers import LinearRouter, NexusRouter, routing_probs
from nexus.model.transformer import Transformer


def test_nexus_expert_embeddings_follow_the_equation():
    router = NexusRouter(d_model=16, domain_embed_dim=12, hidden=20)
    D = torch.randn(5, 12)
    W1, W2 = router.proj.w_in.weight, router.proj.w_out.weight  # (2·20, 12), (16, 20)
    expected = torch.stack([W2 @ swiglu(W1 @ d) for d in D])  # e_i = W2 · SwiGLU(W1 · d_i)
    torch.testing.assert_close(router(D), expected)


def test_no_nexus_parameter_depends_on_the_number_of_experts():
    router = NexusRouter(d_model=16, domain_embed_dim=12)
    shapes = {n: tuple(p.shape) for n, p in router.named_parameters()}
    for n_experts in (1, 3, 9):
        assert router(torch.randn(n_experts, 12)).shape == (n_experts, 16)
    assert shapes == {n: tuple(p.shape) for n, p in router.named_parameters()}


def test_routing_probs_is_softmax_of_dot_products():
    x, E = torch.randn(7, 16), torch.randn(3, 16)
    logits, probs = routing_probs(x, E)
    torch.testing.assert_close(logits, x @ E.t())
    torch.testing.assert_close(probs, torch.softmax(x @ E.t(), dim=-1))


def _moe(router: str) -> Transformer:
    model = Transformer(
        tiny().with_moe(expert_names=["a", "b", "c"], router=router, domain_embed_dim=12, top_k=1)
    )
    model.domain_embeddings.copy_(torch.randn(3, 12)) if model.domain_embeddings is not None else None
    return model.eval()


def test_precomputed_nexus_router_equals_live_and_skips_the_projection():
    model = _moe("nexus")
    idx = torch.randint(0, 96, (2, 24))
    live = model(idx)
    model.precompute_routers()
    calls = []
    for block in model.blocks:
        block.ffn.router.proj.register_forward_hook(lambda *a: calls.append(1))
    pre = model(idx)
    assert calls == []  # the projection MLP no longer runs
    torch.testing.assert_close(pre.logits, live.logits, rtol=0, atol=1e-6)
    for a, b in zip(pre.routing, live.routing):
        assert torch.equal(a.expert_index, b.expert_index)


def test_training_mode_drops_the_precomputed_matrix():
    model = _moe("nexus")
    model.precompute_routers()
    assert all(b.ffn.router.precomputed is not None for b in model.blocks)
    model.train()
    assert all(b.ffn.router.precomputed is None for b in model.blocks)


def test_linear_router_is_its_weight():
    router = LinearRouter(16, 4)
    assert router() is router.weight
