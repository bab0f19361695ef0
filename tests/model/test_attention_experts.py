"""Attention experts (BAM) against themselves and a naive reference: identical experts are the dense
attention, one-hot gates give one expert's dense attention, shared K/V equals full when the experts'
K/V agree, fp64 gradients of every variant equal a loop-over-experts reference, the KV cache."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nexus.config import tiny
from nexus.model.attention_experts import AttentionExperts, attention_gates
from nexus.model.params import parameter_counts
from nexus.model.transformer import Attention, KVCache, RotaryEmbedding, Transformer
from tests.model import N, bam, dense_model, perturbed, sharpen_routers, tokens

VARIANTS = ["full", "shared_kv"]
ROUTINGS = ["soft", "top_k"]
ROUTERS = ["nexus", "linear"]


@pytest.mark.parametrize(
    ("variant", "routing", "router"), list(itertools.product(VARIANTS, ROUTINGS, ROUTERS))
)
def test_attention_experts_from_identical_dense_models_equal_the_dense_model(variant, routing, router):
    dense = dense_model()
    # one routed FFN expert with a renormalised gate is the dense FFN: only the attention is tested
    moe = sharpen_routers(
        bam(
            dense,
            [dense] * N,
            router,
            shared_expert=False,
            normalize_gates=True,
            attention_experts=variant,
            attention_routing=routing,
            attention_top_k=2,
        )
    )
    idx = tokens()
    out = moe(idx)
    assert len(out.attention_routing) == moe.config.n_layers
    assert out.attention_routing[0].probs.std() > 0.05  # the gates differ from token to token
    torch.testing.assert_close(out.logits, dense(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_shared_attention_expert_adds_the_seeds_attention(variant):
    dense = dense_model()
    moe = sharpen_routers(bam(dense, [dense] * N, attention_experts=variant, attention_shared_expert=True))
    h = torch.randn(2, 12, 32)
    layer = moe.blocks[0].attn
    ours, _ = layer(h, moe.rope, moe.domain_embeddings)
    torch.testing.assert_close(ours, 2 * dense.blocks[0].attn(h, dense.rope), rtol=1e-5, atol=1e-6)


def expert_attention(moe: Transformer, e: int, layer: int = 0) -> Attention:
    """Attention expert e of a block as a dense `Attention`: its Q, O and its own or the shared K, V."""
    bam_layer = moe.blocks[layer].attn
    ref = Attention(moe.config)
    with torch.no_grad():
        ref.wq.weight.copy_(bam_layer.experts["wq"][e])
        ref.wo.weight.copy_(bam_layer.experts["wo"][e])
        for p in ("wk", "wv"):
            getattr(ref, p).weight.copy_(
                bam_layer.experts[p][e] if bam_layer.full else getattr(bam_layer, p).weight
            )
    return ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_hot_gates_give_that_experts_dense_attention(variant):
    dense = dense_model()
    experts = [perturbed(dense, seed=i + 1) for i in range(N)]
    moe = bam(dense, experts, attention_experts=variant)
    layer, h = moe.blocks[0].attn, torch.randn(2, 12, 32)
    for e in range(N):
        one_hot = F.one_hot(torch.full((2, 12), e), N).float()
        ours = layer.mix(h, moe.rope, one_hot)
        torch.testing.assert_close(ours, expert_attention(moe, e)(h, moe.rope), rtol=1e-5, atol=1e-6)
        if variant == "full":  # expert e is dense expert e's attention, exactly
            torch.testing.assert_close(ours, experts[e].blocks[0].attn(h, moe.rope), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("routing", "router"), list(itertools.product(ROUTINGS, ROUTERS)))
def test_shared_kv_with_identical_kv_equals_full(routing, router):
    dense = dense_model()
    experts = [perturbed(dense, seed=i + 1, keep=("attn.wk", "attn.wv")) for i in range(N)]
    options = {"attention_routing": routing, "attention_top_k": 2}
    full = sharpen_routers(bam(dense, experts, router, attention_experts="full", **options))
    shared = bam(dense, experts, router, attention_experts="shared_kv", **options)
    routers = {k: v for k, v in full.state_dict().items() if ".router." in k}
    shared.load_state_dict(routers, strict=False)  # the same routers (their init draws differ)
    idx = tokens()
    torch.testing.assert_close(shared(idx).logits, full(idx).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full(idx).logits, dense(idx).logits, atol=1e-3)  # the experts' Q and O differ


def naive_reference(
    layer: AttentionExperts, h: torch.Tensor, rope: RotaryEmbedding, domain_embeddings: torch.Tensor | None
) -> torch.Tensor:
    """`[Attn_s(h) +] Σ_e g_e · W_o,e softmax(causal(Q_e K_eᵀ / √D)) V_e`, one expert at a time, with an
    explicit softmax: the definition, written independently of `AttentionExperts.mix`."""
    B, T, _ = h.shape
    H, G, D = layer.n_heads, layer.kv_heads, layer.head_dim
    probs = torch.softmax(h @ layer.router(domain_embeddings).t(), dim=-1)  # (B, T, n)
    if layer.top_k is not None:
        top, index = probs.topk(layer.top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
    ex = layer.experts

    def bias(name, e):
        return ex[name][e] if name in ex else None

    def kv(e):
        if layer.full:
            return ex["wk"][e], bias("bk", e), ex["wv"][e], bias("bv", e)
        return layer.wk.weight, layer.wk.bias, layer.wv.weight, layer.wv.bias

    slots = [
        (probs[..., e], ex["wq"][e], bias("bq", e), *kv(e), ex["wo"][e]) for e in range(ex["wq"].shape[0])
    ]
    if layer.shared is not None:
        s = layer.shared
        shared_kv = (s.wk.weight, s.wk.bias, s.wv.weight, s.wv.bias) if layer.full else kv(None)
        slots.append((torch.ones_like(probs[..., 0]), s.wq.weight, s.wq.bias, *shared_kv, s.wo.weight))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    y = torch.zeros_like(h)
    for gate, wq, bq, wk, bk, wv, bv, wo in slots:
        q = rope(F.linear(h, wq, bq).view(B, T, H, D).transpose(1, 2))
        k = rope(F.linear(h, wk, bk).view(B, T, G, D).transpose(1, 2)).repeat_interleave(H // G, dim=1)
        v = F.linear(h, wv, bv).view(B, T, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        y = y + gate[..., None] * F.linear(out, wo)
    return y


CASES = [
    (v, r, rt, s, b)
    for v, r, rt, s, b in itertools.product(VARIANTS, ROUTINGS, ROUTERS, [False, True], [False])
]
CASES += [("full", "soft", "nexus", True, True), ("shared_kv", "top_k", "linear", True, True)]


@pytest.mark.parametrize(("variant", "routing", "router", "shared", "qkv_bias"), CASES)
def test_output_and_fp64_gradients_equal_a_naive_reference(variant, routing, router, shared, qkv_bias):
    config = tiny(n_kv_heads=2, qkv_bias=qkv_bias).with_moe(
        expert_names=[f"e{i}" for i in range(N)],
        router=router,
        domain_embed_dim=16,
        attention_experts=variant,
        attention_routing=routing,
        attention_top_k=2,
        attention_shared_expert=shared,
    )
    layer = AttentionExperts(config).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta).double()
    domains = torch.randn(N, 16, generator=gen, dtype=torch.float64) if router == "nexus" else None
    h = torch.randn(2, 10, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 10, 32, generator=gen, dtype=torch.float64)
    params = [h, *layer.parameters()]

    ours, info = layer(h, rope, domains)
    assert info.expert_index.shape[-1] == (2 if routing == "top_k" else N)
    ours_grads = torch.autograd.grad((ours * weights).sum(), params)
    ref = naive_reference(layer, h, rope, domains)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    names = ["h", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, ours_grads, ref_grads):
        assert b.abs().max() > 0, name  # every parameter (and the input) takes part
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_gates_sum_to_one_and_only_top_k_routing_balances_load():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    soft, index = attention_gates(probs)
    assert torch.equal(soft, probs) and index.tolist() == [[0, 1, 2], [2, 1, 0]]
    top, index = attention_gates(probs, 2)
    torch.testing.assert_close(top, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 9, 7 / 9]]))
    assert index[:, 0].tolist() == [0, 2]
    dense = dense_model()
    idx = tokens()
    for routing, balanced in (("soft", False), ("top_k", True)):
        moe = bam(
            dense, [dense] * N, attention_experts="full", attention_routing=routing, load_balance_coef=0.1
        )
        ffn = sum(r.aux_loss for r in moe(idx).routing)
        attn = moe(idx).attention_routing
        assert (sum(r.aux_loss for r in attn) > 0) == balanced
        torch.testing.assert_close(moe(idx).aux_loss, ffn + sum(r.aux_loss for r in attn))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_chunks_equal_the_full_forward(variant):
    dense = dense_model()
    moe = sharpen_routers(
        bam(
            dense,
            [perturbed(dense, i + 1) for i in range(N)],
            attention_experts=variant,
            attention_shared_expert=True,
        )
    )
    idx = tokens(length=20)
    cache = KVCache(moe.config, 2)
    chunks = [moe(idx[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), moe(idx).logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_of_shared_kv_is_the_dense_models():
    dense = dense_model()
    per_token = KVCache(dense.config, 1).bytes_per_token()
    assert per_token == 2 * 2 * dense.config.kv_heads * dense.config.head_dim * 4  # K, V x 2 layers, fp32
    for variant, shared, factor in (
        ("shared_kv", False, 1),
        ("shared_kv", True, 1),
        ("full", False, N),
        ("full", True, N + 1),
    ):
        moe = bam(dense, [dense] * N, attention_experts=variant, attention_shared_expert=shared)
        assert KVCache(moe.config, 3).bytes_per_token() == factor * per_token


def test_precomputed_attention_routers_route_the_same():
    dense = dense_model()
    moe = sharpen_routers(bam(dense, [perturbed(dense, i + 1) for i in range(N)], attention_experts="full"))
    idx = tokens()
    live = moe(idx).logits
    moe.precompute_routers()
    assert all(b.attn.router.precomputed is not None for b in moe.blocks)
    torch.testing.assert_close(moe(idx).logits, live, rtol=0, atol=0)


def test_parameter_counts_of_attention_experts():
    dense = dense_model()
    d, layers = dense.config.d_model, dense.config.n_layers
    qo = 2 * d * d  # wq + wo of one expert (4 heads x 8 = d)
    kv = 2 * d * dense.config.kv_heads * dense.config.head_dim
    ffn_only = parameter_counts(bam(dense, [dense] * N, router="linear"))
    soft = parameter_counts(bam(dense, [dense] * N, router="linear", attention_experts="full"))
    assert soft["total"] - ffn_only["total"] == layers * ((N - 1) * (qo + kv) + N * d)  # + attention router
    assert soft["total"] - soft["active_training"] == ffn_only["total"] - ffn_only["active_training"]
    top1 = parameter_counts(
        bam(dense, [dense] * N, router="linear", attention_experts="full", attention_routing="top_k")
    )
    assert top1["active_training"] == soft["active_training"] - layers * (N - 1) * qo  # K, V stay active
    nexus = parameter_counts(bam(dense, [dense] * N, attention_experts="shared_kv"))
    linear = parameter_counts(bam(dense, [dense] * N, router="linear", attention_experts="shared_kv"))
    assert nexus["active_inference"] == linear["active_inference"]  # both routers precomputed to n x d


def test_a_bam_model_learns_a_fixed_batch():
    dense = dense_model()
    moe = bam(dense, [perturbed(dense, i + 1) for i in range(N)], attention_experts="shared_kv").train()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    batch = tokens(33)
    losses = []
    for _ in range(15):
        out = moe(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
