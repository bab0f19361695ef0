"""The MoE layer's sorted dispatch against a naive per-token reference, and its auxiliary losses."""

import pytest
import torch

from nexus.config import MoEConfig
from nexus.model.ffn import swiglu
from nexus.model.moe import MoELayer, load_balance_loss, router_z_loss
from nexus.model.routers import routing_probs


def make_layer(router="linear", top_k=1, n=4, shared=True, dispatch="sorted", **kw):
    cfg = MoEConfig(
        expert_names=[f"e{i}" for i in range(n)],
        router=router,
        top_k=top_k,
        shared_expert=shared,
        domain_embed_dim=12,
        dispatch=dispatch,
        **kw,
    )
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


# ------------------------------------------------------------------ the grouped (GPU) path, on CPU
def test_padded_layout_aligns_every_group_and_keeps_rows_in_order():
    from nexus.model.moe import GROUP_ALIGN, padded_layout

    counts = torch.tensor([3, 0, 17, 1])
    sorted_expert = torch.repeat_interleave(torch.arange(4), counts)
    size = int(counts.sum()) + 4 * GROUP_ALIGN
    pos, ends = padded_layout(sorted_expert, counts, size)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), ends[:-1]])
    assert (starts % GROUP_ALIGN == 0).all() and ends[-1] == size and ends.dtype == torch.int32
    for e in range(4):  # expert e's rows sit, in order, at the front of its group
        rows = pos[sorted_expert == e]
        assert rows.tolist() == list(range(int(starts[e]), int(starts[e]) + int(counts[e])))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_grouped_dispatch_equals_naive_reference_forward_and_grads(top_k, shared):
    """`_grouped_mm` has no fp64 kernel: fp32 against the fp64 per-token reference."""
    layer = make_layer("nexus", top_k, shared=shared, dispatch="grouped_mm")
    D = torch.randn(4, 12, dtype=torch.float64)
    x64 = torch.randn(45, 16, dtype=torch.float64, requires_grad=True)
    y_ref = naive_reference(layer, x64, D)
    layer32 = make_layer("nexus", top_k, shared=shared, dispatch="grouped_mm").float()
    layer32.load_state_dict(layer.state_dict())
    x32 = x64.detach().float().requires_grad_(True)
    y, _ = layer32(x32, D.float())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * w.float()).sum(), [x32, *layer32.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x64, *layer.parameters()], allow_unused=True)
    for (name, _), g, g_ref in zip([("x", None), *layer.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm"])
def test_bf16_autocast_parity_and_grouped_gemms_in_bf16(dispatch):
    """Under bf16 autocast both paths match fp32, return bf16, keep fp32 parameter gradients, and the
    grouped GEMMs receive bf16 operands (autocast does not cover `_grouped_mm`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GroupedDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().startswith("aten::_grouped_mm"):
                self.dtypes.append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    layer = make_layer("nexus", top_k=2, shared=True, dispatch=dispatch).float()
    D, x = torch.randn(4, 12), torch.randn(64, 16)
    reference, _ = layer(x, D)
    with torch.autocast("cpu", dtype=torch.bfloat16), GroupedDtypes() as seen:
        y, _ = layer(x, D)
    assert y.dtype == torch.bfloat16
    assert seen.dtypes == ([(torch.bfloat16, torch.bfloat16)] * 2 if dispatch == "grouped_mm" else [])
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def _ops_of_forward_backward(layer, x, D):
    """(aten ops, tensor methods/functions) of one forward and one backward, in call order."""
    from benchmarks.gpu_check import record_ops

    def step():
        y, info = layer(x, D)
        (y.float().square().sum() + info.aux_loss).backward()

    layer.zero_grad(set_to_none=True)
    return record_ops(step)


def test_grouped_path_runs_the_same_ops_for_any_token_count_and_none_that_syncs():
    """What makes `torch.cuda.set_sync_debug_mode("error")` pass on a GPU: the op sequence of a
    forward + backward is the same for 64 and 4096 tokens (nothing sized by data on the host), holds
    no op that needs a device value on the host, and no `.tolist()`/`.item()`/`bool()` is called."""
    from benchmarks.gpu_check import HOST_READS, SYNCING_OPS

    layer = make_layer("nexus", top_k=2, n=4, dispatch="grouped_mm").float()
    D = torch.randn(4, 12)
    small, small_calls = _ops_of_forward_backward(layer, torch.randn(64, 16), D)
    large, _ = _ops_of_forward_backward(layer, torch.randn(4096, 16), D)
    assert small == large
    assert "aten::_grouped_mm" in small and not SYNCING_OPS & set(small), sorted(SYNCING_OPS & set(small))
    assert not HOST_READS & set(small_calls), sorted(HOST_READS & set(small_calls))
    _, sorted_calls = _ops_of_forward_backward(make_layer("linear").float(), torch.randn(64, 16), None)
    assert "tolist" in sorted_calls  # the CPU path's counts.tolist(): the check sees host reads


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_bf16_weight_gradient_error_is_no_worse_than_plain_autograd():
    """32768 rows over 4 experts (32 row blocks each) under bf16 autocast, with fixed routing: the
    expert weight gradients of both paths against fp64 are as accurate as per-expert `F.linear`
    autograd's (one bf16 rounding per gradient, fp32 accumulation inside the GEMMs)."""
    import torch.nn.functional as F

    from nexus.model.moe import experts_ffn, grouped_experts_ffn

    g = torch.Generator().manual_seed(0)
    n, d, f, rows = 4, 32, 32, 32768
    counts = torch.full((n,), rows // n)
    sorted_expert = torch.repeat_interleave(torch.arange(n), counts)
    x = torch.randn(rows, d, generator=g)
    w_in, w_out = torch.randn(n, 2 * f, d, generator=g) * 0.2, torch.randn(n, d, f, generator=g) * 0.2
    grad_y = torch.randn(rows, d, generator=g)

    def weight_grads(fn, dtype):
        a, b = w_in.to(dtype, copy=True).requires_grad_(True), w_out.to(dtype, copy=True).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            y = fn(x.to(dtype), a, b)
        torch.autograd.backward(y, grad_y.to(y.dtype))
        return a.grad, b.grad

    def plain(xs, a, b):
        bounds = counts.cumsum(0).tolist()
        return torch.cat(
            [
                F.linear(swiglu(F.linear(xs[s:e], a[i])), b[i])
                for i, (s, e) in enumerate(zip([0, *bounds[:-1]], bounds))
            ]
        )

    ref = weight_grads(plain, torch.float64)
    errors = {}
    for name, fn in {
        "autograd": plain,
        "sorted": lambda xs, a, b: experts_ffn(xs, a, b, counts.tolist()),
        "grouped": lambda xs, a, b: grouped_experts_ffn(xs, a, b, counts, sorted_expert),
    }.items():
        errors[name] = [_relative_error(g_, r) for g_, r in zip(weight_grads(fn, torch.float32), ref)]
    print("relative weight-gradient error vs fp64 (w_in, w_out):", errors)
    for name in ("sorted", "grouped"):
        for ours, base in zip(errors[name], errors["autograd"]):
            assert ours <= 1.1 * base, errors
