"""Upcycling, extension and removal with attention experts (BAM): each dense expert's attention in its
slot, `extend` leaves the old attention experts untouched and appends the new one, `remove_expert`
inverts it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nexus.attention_upcycling import is_attention_expert_key
from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.upcycling import extend, remove_expert
from tests.model import N, bam, dense_model, perturbed, sharpen_routers, tokens

VARIANTS = ["full", "shared_kv"]
ROUTERS = ["nexus", "linear"]
SLOTS = {"wq": "wq.weight", "wk": "wk.weight", "wv": "wv.weight", "wo": "wo.weight"}


def build(variant: str, router: str, shared: bool = True):
    dense = dense_model()
    experts = [perturbed(dense, seed=i + 1) for i in range(N)]
    moe = sharpen_routers(
        bam(dense, experts, router, attention_experts=variant, attention_shared_expert=shared)
    )
    new = perturbed(dense, seed=9)
    d_new = torch.randn(16, generator=torch.Generator().manual_seed(5)) if router == "nexus" else None
    return dense, experts, moe, new, d_new


@pytest.mark.parametrize("variant", VARIANTS)
def test_upcycle_puts_each_experts_attention_in_its_slot(variant):
    dense, experts, moe, _, _ = build(variant, "nexus")
    state = moe.state_dict()
    for i in range(moe.config.n_layers):
        p = f"blocks.{i}.attn."
        for e, expert in enumerate(experts):
            for name, dense_name in SLOTS.items():
                if f"{p}experts.{name}" in state:
                    assert torch.equal(state[f"{p}experts.{name}"][e], expert.state_dict()[p + dense_name])
        assert torch.equal(state[f"{p}shared.wq.weight"], dense.state_dict()[f"{p}wq.weight"])  # the seed's
        if variant == "shared_kv":  # one K/V: the experts' mean
            mean = sum(x.state_dict()[f"{p}wk.weight"] for x in experts) / N
            torch.testing.assert_close(state[f"{p}wk.weight"], mean)
            assert f"{p}experts.wk" not in state and f"{p}shared.wk.weight" not in state
        else:
            assert f"{p}wk.weight" not in state and f"{p}experts.wk" in state


@pytest.mark.parametrize(("variant", "router"), list(itertools.product(VARIANTS, ROUTERS)))
def test_extend_leaves_old_attention_experts_untouched(variant, router):
    _, _, moe, new, d_new = build(variant, router)
    lam = 0.25
    ext = extend(moe, new, domain_embedding=d_new, name="new", lam=lam)
    old, state = moe.state_dict(), ext.state_dict()
    for key, tensor in old.items():
        if ".attn.experts." in key or key.endswith("attn.router.weight"):
            assert state[key].shape[0] == N + 1
            assert torch.equal(state[key][:N], tensor), key
        elif is_attention_expert_key(key):  # Nexus projection, shared attention expert
            assert torch.equal(state[key], tensor), key
        elif ".attn.w" in key:  # what stays shared (shared_kv's K/V) is λ-merged
            merged = (1 - lam) * tensor + lam * new.state_dict()[key]
            torch.testing.assert_close(state[key], merged)
    for i in range(moe.config.n_layers):
        for name, dense_name in SLOTS.items():
            key = f"blocks.{i}.attn.experts.{name}"
            if key in state:
                assert torch.equal(state[key][N], new.state_dict()[f"blocks.{i}.attn.{dense_name}"])
    if variant == "full":  # every old attention expert computes what it did (it shares nothing)
        h = torch.randn(2, 12, 32)
        for e in range(N):
            gates = F.one_hot(torch.full((2, 12), e), N)
            before = moe.blocks[1].attn.mix(h, moe.rope, gates.float())
            after = ext.blocks[1].attn.mix(h, ext.rope, F.pad(gates, (0, 1)).float())
            torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert ext(tokens()).attention_routing[0].probs.shape[-1] == N + 1


@pytest.mark.parametrize(("variant", "router"), list(itertools.product(VARIANTS, ROUTERS)))
def test_remove_expert_inverts_extend(variant, router):
    _, _, moe, new, d_new = build(variant, router)
    exact = remove_expert(extend(moe, new, domain_embedding=d_new, name="new", lam=0.0), "new")
    assert exact.config == moe.config
    for key, tensor in moe.state_dict().items():
        assert torch.equal(exact.state_dict()[key], tensor), key
    idx = tokens()
    assert torch.equal(exact(idx).logits, moe(idx).logits)
    merged = remove_expert(extend(moe, new, domain_embedding=d_new, name="new"), "new")  # λ = 1/(n+1)
    for key, tensor in moe.state_dict().items():  # every per-expert tensor comes back; merged ones cannot
        if is_attention_expert_key(key) or ".ffn." in key:
            assert torch.equal(merged.state_dict()[key], tensor), key


def test_remove_expert_drops_that_attention_expert():
    _, _, moe, _, _ = build("full", "linear")
    out = remove_expert(moe, 1)
    for key, tensor in moe.state_dict().items():
        if ".attn.experts." in key or key.endswith("attn.router.weight"):
            assert torch.equal(out.state_dict()[key], tensor[[0, 2]]), key


def test_a_bam_checkpoint_round_trips(tmp_path):
    _, _, moe, new, d_new = build("shared_kv", "nexus")
    moe = extend(moe, new, domain_embedding=d_new, name="new")
    loaded = load_checkpoint(save_checkpoint(moe, tmp_path / "bam"))
    assert loaded.config == moe.config and loaded.config.moe.attention_experts == "shared_kv"
    idx = tokens()
    assert torch.equal(loaded.eval()(idx).logits, moe(idx).logits)
