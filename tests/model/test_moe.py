"""The MoE layer's sorted dispatch against a naive per-token reference, and its auxiliary losses."""
import pytest
import torch

from nexus.config import MoEConfig
from nexus.model.ffn import swiglu
from nexus.model.moe import MoELayer, load_balance_loss, router_z_loss
from nexus.model.routers import routing_probs


def make_layer(router="linear", top_k=1, n=4, shared=True, dispatch="sorted", **kw):
    cfg = MoEConfig(expert_names=[f"e{i}" for i in range(n)], router=router, top_k=top_k,
                    shared_expert=shared, domain_embed_dim=12, dispatch=dispatch, **kw)
    layer = MoELayer(16, 24, cfg).double()
    with torch.no_grad():  # experts distinct and O(1) so differences are visible
        layer.experts.w_in.normal_(std=0.3)
        layer.experts.w_out.normal_(std=0.3)
    return layer


def naive_reference(layer: MoELayer, x, domain_embeddings):
    """y_t = FFN_s(x_t) + Σ_{k ∈ TopK(s_t)} s_tk · FFN_ek(x_t), one token at a time."""
    _, probs = routing_probs(x, layer.router(domain_embeddings))
    rows = []
    for t in range(x.shape[0]):
        y = layer.shared(x[t]) if layer.shared is not None else torch.zeros_like(x[t])
        gates, idx = probs[t].topk(layer.config.top_k)
        if layer.config.normalize_gates:
            gates = gates / gates.sum()
        for g, e in zip(gates, idx):
            h = swiglu(layer.experts.w_in[e] @ x[t])
            y = y + g.to(x.dtype) * (layer.experts.w_out[e] @ h)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("router", ["linear", "nexus"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_dispatch_equals_naive_reference_forward_and_grads(router, top_k, shared):
    layer = make_layer(router, top_k, shared=shared)
    D = torch.randn(4, 12, dtype=torch.float64)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    y, info = layer(x, D)
    y_ref = naive_reference(layer, x_ref, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert info.expert_index.shape == (37, top_k)

    w = torch.randn_like(y)  # a non-uniform upstream gradient
    grads = torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *layer.parameters()], allow_unused=True)
    for (name, _), g, g_ref in zip([("x", None), *layer.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_normalized_gates_match_reference():
    layer = make_layer("linear", top_k=2, normalize_gates=True)
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], naive_reference(layer, x, None))


def test_every_token_is_routed_even_when_one_expert_takes_all():
    """Dropless: a router that sends every token to expert 2 still processes all tokens."""
    layer = make_layer("linear", top_k=1, shared=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 50.0
    x = torch.rand(64, 16, dtype=torch.float64) + 0.1  # positive, so x · w_2 dominates
    y, info = layer(x)
    assert (info.expert_index == 2).all()
    torch.testing.assert_close(y, naive_reference(layer, x, None))


def test_grouped_mm_dispatch_equals_sorted():
    sorted_layer = make_layer("linear", top_k=2).float()
    grouped = make_layer("linear", top_k=2, dispatch="grouped_mm").float()
    grouped.load_state_dict(sorted_layer.state_dict())
    x = torch.randn(50, 16)
    torch.testing.assert_close(grouped(x)[0], sorted_layer(x)[0], rtol=1e-5, atol=1e-5)


def test_load_balance_loss_is_one_when_balanced_and_n_when_collapsed():
    n = 4
    uniform = torch.full((8, n), 1.0 / n)
    balanced_idx = torch.arange(8).remainder(n).unsqueeze(1)
    assert load_balance_loss(uniform, balanced_idx).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, n)
    collapsed[:, 0] = 1.0
    assert load_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(n)


def test_aux_loss_weights_and_z_loss():
    layer = make_layer("linear", top_k=1, load_balance_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(30, 16, dtype=torch.float64)
    _, info = layer(x)
    logits = x @ layer.router.weight.t()
    torch.testing.assert_close(info.z_loss, router_z_loss(logits))
    torch.testing.assert_close(info.aux_loss, 0.5 * info.load_balance_loss + 0.1 * info.z_loss)


@pytest.mark.parametrize("top_k", [1, 2])
def test_blocked_expert_kernel_equals_reference_across_blocks(monkeypatch, top_k):
    """Experts spanning several row blocks (and an expert with no rows) give the reference output
    and gradients; `y.sum()` (a zero-stride upstream gradient) is accepted."""
    from nexus.model import moe

    monkeypatch.setattr(moe, "BLOCK_ROWS", 3)
    layer = make_layer("linear", top_k=top_k, n=4)
    with torch.no_grad():
        layer.router.weight[3] = -100.0  # expert 3 gets no tokens
    x = torch.randn(41, 16, dtype=torch.float64).abs().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, info = layer(x)
    assert not (info.expert_index == 3).any()
    y_ref = naive_reference(layer, x_ref, None)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad(y_ref.sum(), [x_ref, *layer.parameters()], allow_unused=True)
    for (name, _), g, g_ref in zip([("x", None), *layer.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_expert_kernel_gradcheck():
    from nexus.model.moe import experts_ffn

    w_in = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: experts_ffn(a, b, c, [4, 0, 3]), (x, w_in, w_out))


@pytest.mark.parametrize("shared", [True, False])
def test_bf16_autocast_matches_fp32_and_keeps_fp32_gradients(shared):
    """bf16-mixed training: the expert kernel follows autocast like nn.Linear does."""
    layer = make_layer("nexus", top_k=2, shared=shared).float()
    D, x = torch.randn(4, 12), torch.randn(64, 16)
    reference, _ = layer(x, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x, D)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().square().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32 and torch.isfinite(layer.experts.w_in.grad).all()
