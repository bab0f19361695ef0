"""Upcycling operations checked against their definitions and against each other."""

import pytest
import torch

from nexus.config import tiny
from nexus.errors import IncompatibleModelsError
from nexus.model import parameter_counts
from nexus.model.transformer import Transformer
from nexus.upcycling import (
    extend,
    is_ffn_key,
    merge_dense,
    non_ffn_keys,
    remove_expert,
    sparse_upcycle,
    upcycle,
)

M = 12  # domain embedding dimension in these tests


def dense(**overrides) -> Transformer:
    return Transformer(tiny(**overrides))


@pytest.fixture
def family():
    torch.manual_seed(0)
    return dense(), [dense() for _ in range(3)], torch.randn(3, M)


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_upcycle_copies_ffns_and_averages_the_rest(family, router):
    seed, experts, D = family
    moe = upcycle(seed, experts, domain_embeddings=D, router=router, expert_names=["a", "b", "c"])
    state = moe.state_dict()
    for i in range(seed.config.n_layers):
        for proj in ("w_in", "w_out"):
            assert torch.equal(
                state[f"blocks.{i}.ffn.shared.{proj}.weight"],
                seed.state_dict()[f"blocks.{i}.ffn.{proj}.weight"],
            )
            for e, expert in enumerate(experts):
                assert torch.equal(
                    state[f"blocks.{i}.ffn.experts.{proj}"][e],
                    expert.state_dict()[f"blocks.{i}.ffn.{proj}.weight"],
                )
    keys = non_ffn_keys(moe)
    assert "tok_emb.weight" in keys and "blocks.1.attn.wq.weight" in keys and "norm.weight" in keys
    for key in keys:
        mean = torch.stack([e.state_dict()[key] for e in experts]).mean(0)
        torch.testing.assert_close(state[key], mean, rtol=0, atol=1e-7)
    assert moe.config.moe.expert_names == ["a", "b", "c"]
    if router == "nexus":
        assert torch.equal(moe.domain_embeddings, D)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_of_identical_experts_equals_the_dense_model(top_k):
    """Renormalised gates over identical experts sum to one copy of the FFN: the MoE is the model."""
    expert = dense()
    moe = upcycle(
        dense(),
        [expert] * 3,
        domain_embeddings=torch.randn(3, M),
        shared_expert=False,
        normalize_gates=True,
        top_k=top_k,
    )
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(moe(idx).logits, expert(idx).logits, rtol=1e-5, atol=1e-5)


def test_merge_dense_is_the_mean_of_seed_and_experts(family):
    seed, experts, _ = family
    merged = merge_dense(seed, experts)
    for key, tensor in merged.state_dict().items():
        mean = torch.stack([m.state_dict()[key] for m in [seed, *experts]]).mean(0)
        torch.testing.assert_close(tensor, mean, rtol=0, atol=1e-7)


def test_sparse_upcycle_copies_one_ffn_into_every_expert():
    base = dense()
    moe = sparse_upcycle(base, n_experts=4, top_k=2)
    assert moe.config.moe.router == "linear" and moe.config.moe.n_experts == 4
    w = moe.state_dict()["blocks.0.ffn.experts.w_in"]
    assert all(torch.equal(w[e], base.state_dict()["blocks.0.ffn.w_in.weight"]) for e in range(4))
    assert torch.equal(moe.state_dict()["tok_emb.weight"], base.state_dict()["tok_emb.weight"])


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_extend_keeps_old_experts_and_applies_lambda_exactly(family, router):
    seed, experts, D = family
    moe = upcycle(seed, experts, domain_embeddings=D, router=router)
    new, d_new = dense(), torch.randn(M)
    ext = extend(moe, new, domain_embedding=d_new, name="code")
    old, out, new_state = moe.state_dict(), ext.state_dict(), new.state_dict()
    assert ext.config.moe.expert_names == [*moe.config.moe.expert_names, "code"]
    lam = 1 / 4
    for key in non_ffn_keys(moe):
        torch.testing.assert_close(out[key], (1 - lam) * old[key] + lam * new_state[key], rtol=0, atol=1e-7)
    for key, tensor in old.items():
        if ".ffn.experts." in key or key.endswith("router.weight"):
            assert torch.equal(out[key][:3], tensor), key  # old experts / old router rows untouched
        elif is_ffn_key(key):
            assert torch.equal(out[key], tensor), key  # shared expert, Nexus projection untouched
    assert torch.equal(out["blocks.0.ffn.experts.w_out"][3], new_state["blocks.0.ffn.w_out.weight"])
    if router == "nexus":
        assert torch.equal(ext.domain_embeddings[:3], D) and torch.equal(ext.domain_embeddings[3], d_new)


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_extend_with_lambda_zero_keeps_every_non_ffn_weight_exactly(family, router):
    seed, experts, D = family
    moe = upcycle(seed, experts, domain_embeddings=D, router=router)
    ext = extend(moe, dense(), domain_embedding=torch.randn(M), name="code", lam=0.0)
    for key in non_ffn_keys(moe):
        assert torch.equal(ext.state_dict()[key], moe.state_dict()[key]), key
    assert not torch.equal(
        extend(moe, dense(), domain_embedding=torch.randn(M), lam=0.5).tok_emb.weight, moe.tok_emb.weight
    )


def test_linear_router_reset_redraws_every_row_and_append_keeps_the_trained_ones(family):
    seed, experts, D = family
    moe = upcycle(seed, experts, router="linear", init_seed=1)
    with torch.no_grad():
        for block in moe.blocks:
            block.ffn.router.weight.mul_(3.0)  # "trained" rows, unlike any fresh draw
    appended = extend(moe, dense(), name="code", init_seed=7)
    reset = extend(moe, dense(), name="code", init_seed=7, linear_router="reset")
    for block, old, app in zip(reset.blocks, moe.blocks, appended.blocks):
        w, w_old = block.ffn.router.weight, old.ffn.router.weight
        assert w.shape == (4, 32)
        assert all(not torch.equal(w[i], w_old[i]) for i in range(3))  # every old row re-initialised
        assert torch.equal(app.ffn.router.weight[:3], w_old)
        assert torch.equal(w[3], app.ffn.router.weight[3])  # both draw the new row from init_seed
        assert w.std() < w_old.std() / 2  # the fresh init scale, not the trained rows'
    again = extend(moe, dense(), name="code", init_seed=7, linear_router="reset")
    assert torch.equal(again.blocks[0].ffn.router.weight, reset.blocks[0].ffn.router.weight)
    nexus = upcycle(seed, experts, domain_embeddings=D)  # a Nexus router has no rows to reset
    ext = extend(nexus, dense(), domain_embedding=torch.randn(M), linear_router="reset")
    assert torch.equal(ext.blocks[0].ffn.router.proj.w_in.weight, nexus.blocks[0].ffn.router.proj.w_in.weight)
    with pytest.raises(IncompatibleModelsError, match="linear_router"):
        extend(moe, dense(), linear_router="keep")


def test_extend_leaves_old_expert_outputs_unchanged(family):
    seed, experts, D = family
    moe = upcycle(seed, experts, domain_embeddings=D)
    ext = extend(moe, dense(), domain_embedding=torch.randn(M))
    x = torch.randn(10, 32)
    for e in range(3):
        before = moe.blocks[0].ffn.experts(x, torch.tensor([10 if i == e else 0 for i in range(3)]))
        after = ext.blocks[0].ffn.experts(x, torch.tensor([10 if i == e else 0 for i in range(4)]))
        assert torch.equal(before, after)


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_remove_expert_inverts_extend_for_ffn_and_router(family, router):
    seed, experts, D = family
    moe = upcycle(seed, experts, domain_embeddings=D, router=router)
    back = remove_expert(extend(moe, dense(), domain_embedding=torch.randn(M), name="new"), "new")
    assert back.config.moe == moe.config.moe
    for key, tensor in moe.state_dict().items():
        if is_ffn_key(key) or key == "domain_embeddings":
            assert torch.equal(back.state_dict()[key], tensor), key


def test_nexus_vs_linear_parameter_counts_differ_only_by_the_projections(family):
    """Mirrors the paper's Table 3: Nexus adds the projection MLPs in training, nothing at inference."""
    seed, experts, D = family
    cfg = seed.config
    nexus = parameter_counts(upcycle(seed, experts, domain_embeddings=D, router="nexus"))
    linear = parameter_counts(upcycle(seed, experts, router="linear"))
    h, f, n, L, k = cfg.d_model, cfg.ffn_hidden, 3, cfg.n_layers, 1
    projection = M * 2 * h + h * h  # W1: m -> 2h (SwiGLU), W2: h -> h
    assert nexus["total"] - linear["total"] == L * (projection - n * h)
    assert nexus["active_training"] - linear["active_training"] == L * (projection - n * h)
    assert nexus["active_inference"] == linear["active_inference"]
    per_expert = 3 * h * f
    assert linear["total"] - linear["active_training"] == L * (n - k) * per_expert
    seed_total = parameter_counts(seed)["total"]
    assert linear["active_inference"] == seed_total + L * (k * per_expert + n * h)


def test_bad_inputs_raise_clear_errors(family):
    seed, experts, D = family
    with pytest.raises(IncompatibleModelsError, match="n=0"):
        upcycle(seed, [], domain_embeddings=D)
    with pytest.raises(IncompatibleModelsError, match=r"expert 1 .*d_model=48 \(expected 32\)"):
        upcycle(seed, [experts[0], dense(d_model=48, n_heads=4)], domain_embeddings=D[:2])
    with pytest.raises(IncompatibleModelsError, match="ffn_hidden"):
        merge_dense(seed, [dense(ffn_hidden=32)])
    with pytest.raises(IncompatibleModelsError, match="needs domain_embeddings"):
        upcycle(seed, experts, router="nexus")
    with pytest.raises(IncompatibleModelsError, match=r"shape \(2, 12\); expected \(3, m\)"):
        upcycle(seed, experts, domain_embeddings=D[:2])
    moe = upcycle(seed, experts, domain_embeddings=D)
    with pytest.raises(IncompatibleModelsError, match="dimension 5 differs .* domain_embed_dim=12"):
        extend(moe, dense(), domain_embedding=torch.randn(5))
    with pytest.raises(IncompatibleModelsError, match="needs domain_embeddings"):
        extend(moe, dense())
    with pytest.raises(IncompatibleModelsError, match="already has an expert named 'expert_0'"):
        extend(moe, dense(), domain_embedding=torch.randn(M), name="expert_0")
    with pytest.raises(IncompatibleModelsError, match="n_layers=3"):
        extend(moe, dense(n_layers=3), domain_embedding=torch.randn(M))
    with pytest.raises(IncompatibleModelsError, match="no expert 'zzz'"):
        remove_expert(moe, "zzz")
    with pytest.raises(IncompatibleModelsError, match="seed must be a dense model"):
        upcycle(moe, experts, domain_embeddings=D)


def test_compatibility_ignores_init_settings_and_resolves_kv_heads():
    seed = dense()
    moe = upcycle(seed, [dense(n_kv_heads=4), dense(init_std=0.01)], domain_embeddings=torch.randn(2, M))
    assert moe.config.moe.n_experts == 2


def test_fresh_router_initialisation_is_deterministic_and_leaves_global_rng_alone(family):
    seed, experts, _ = family
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = upcycle(seed, experts, router="linear")
    after = torch.rand(1)
    b = upcycle(seed, experts, router="linear")
    assert torch.equal(before, after)  # the caller's random stream is untouched
    assert torch.equal(a.blocks[0].ffn.router.weight, b.blocks[0].ffn.router.weight)
    c = upcycle(seed, experts, router="linear", init_seed=1)
    assert not torch.equal(a.blocks[0].ffn.router.weight, c.blocks[0].ffn.router.weight)
    new = dense()
    assert torch.equal(
        extend(a, new).state_dict()["blocks.0.ffn.router.weight"],
        extend(b, new).state_dict()["blocks.0.ffn.router.weight"],
    )


def test_router_initialisation_is_deterministic_under_threads(family):
    """The flows build MoEs in parallel threads while other threads use torch's global RNG."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    seed, experts, D = family
    reference = upcycle(seed, experts, domain_embeddings=D, router="nexus").state_dict()
    stop = threading.Event()

    def draw() -> None:  # another stage consuming (and seeding) the global generator meanwhile
        while not stop.is_set():
            torch.manual_seed(7)
            torch.randn(64, 64)

    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(draw) for _ in range(2)]
        built = [pool.submit(upcycle, seed, experts, domain_embeddings=D, router="nexus") for _ in range(6)]
        states = [f.result().state_dict() for f in built]
        stop.set()
        [f.result() for f in noise]
    for state in states:
        for key, tensor in reference.items():
            assert torch.equal(state[key], tensor), key
