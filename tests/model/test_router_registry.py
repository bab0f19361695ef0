"""The router registry (`nexus.model.routers.ROUTERS`): validation reads it, each router kind's declared
attributes match the modules it builds, and a newly registered router works through upcycle, extend,
remove_expert, the forward pass and a checkpoint with no edit elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import DEFAULT_ROUTER, MoEConfig, tiny
from nexus.errors import ConfigError
from nexus.model.params import parameter_counts
from nexus.model.routers import ROUTERS, Router, get_router, router_names, router_param
from nexus.model.transformer import Transformer
from nexus.upcycling import extend, remove_expert, upcycle


class UniformRouter(Router):
    """A third router, as a new engineer would add one: `E = 0`, so every expert has probability 1/n.
    No parameters and no domain embeddings: registering it must be all it takes."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.zeros(n_experts, d_model), persistent=False)

    @classmethod
    def from_config(cls, d_model: int, n_experts: int, moe: MoEConfig) -> UniformRouter:
        return cls(d_model, n_experts)

    def forward(self, domain_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.matrix


class RowsRouter(Router):
    """A linear router under another parameter name: its per-expert rows are found by what it declares."""

    expert_rows = ("rows",)

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.randn(n_experts, d_model) * 0.02)

    @classmethod
    def from_config(cls, d_model: int, n_experts: int, moe: MoEConfig) -> RowsRouter:
        return cls(d_model, n_experts)

    def forward(self, domain_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.rows


@pytest.fixture
def uniform(monkeypatch):
    monkeypatch.setitem(ROUTERS, "uniform", UniformRouter)
    monkeypatch.setitem(ROUTERS, "rows", RowsRouter)
    return "uniform"


def _model(router: str, n: int, attention_experts: str = "full") -> Transformer:
    return Transformer(
        tiny().with_moe(
            expert_names=[f"e{i}" for i in range(n)],
            router=router,
            domain_embed_dim=12,
            attention_experts=attention_experts,
        )
    )


def test_the_registry_holds_the_paper_router_its_baseline_and_what_is_registered(uniform):
    assert router_names() == tuple(ROUTERS) and {DEFAULT_ROUTER, "linear", uniform} <= set(router_names())
    assert get_router(uniform) is UniformRouter
    assert get_router("nexus").uses_domain_embeddings and not get_router("linear").uses_domain_embeddings
    assert get_router("linear").resettable and not get_router("nexus").resettable


def test_moe_config_validates_router_names_through_the_registry(uniform):
    with pytest.raises(ConfigError, match="must be 'nexus', 'linear', 'uniform' or 'rows', got 'hash'"):
        MoEConfig(expert_names=["a"], router="hash")
    assert MoEConfig(expert_names=["a"], router=uniform).router == uniform


@pytest.mark.parametrize("router", [*router_names(), "uniform", "rows"])
def test_each_router_builds_its_module_and_declares_what_depends_on_the_experts(router, uniform):
    """A router tensor's shape depends on the number of experts exactly where `has_expert_rows` says
    so: those tensors are what `extend` appends to and `remove_expert` slices."""
    kind = get_router(router)
    small, large = _model(router, 2), _model(router, 3)
    assert all(isinstance(layer.router, kind) for b in large.blocks for layer in (b.ffn, b.attn))
    assert (large.domain_embeddings is not None) == kind.uses_domain_embeddings
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    for key, tensor in large.state_dict().items():
        if router_param(key) is None and key != "domain_embeddings":
            continue
        assert kind.has_expert_rows(key) == (tensor.shape != shapes[key]), key
        if kind.has_expert_rows(key):
            assert tensor.shape[0] == 3 and shapes[key][0] == 2, key


@pytest.mark.parametrize("router", router_names())
def test_extend_resets_the_ffn_router_only_when_the_router_is_resettable(router):
    torch.manual_seed(0)
    seed, a, b, c = (Transformer(tiny()) for _ in range(4))
    moe = upcycle(seed, [a, b], domain_embeddings=torch.randn(2, 12), router=router, init_seed=1)
    for p in moe.blocks[0].ffn.router.parameters():  # "trained": no longer what a fresh draw gives
        p.data.add_(1.0)
    kwargs = dict(domain_embedding=torch.randn(12), name="c", init_seed=2)
    old = dict(moe.blocks[0].ffn.router.named_parameters())
    kept = dict(extend(moe, c, linear_router="reset", **kwargs).blocks[0].ffn.router.named_parameters())
    for name, tensor in old.items():
        rows = (
            slice(0, 2) if get_router(router).has_expert_rows(f"blocks.0.ffn.router.{name}") else slice(None)
        )
        assert torch.equal(kept[name][rows], tensor[rows]) != get_router(router).resettable, name


@pytest.mark.parametrize("router", ["linear", "rows"])
def test_extend_and_remove_keep_every_experts_router_row(router, uniform):
    torch.manual_seed(0)
    seed, a, b, c = (Transformer(tiny()) for _ in range(4))
    moe = upcycle(seed, [a, b], router=router, expert_names=["a", "b"], attention_experts="full")
    old = {k: v for k, v in moe.state_dict().items() if get_router(router).has_expert_rows(k)}
    assert len(old) == 2 * moe.config.n_layers  # the FFN's and the attention experts' router, per block
    grown = extend(moe, c, name="c").state_dict()
    shrunk = remove_expert(moe, "a").state_dict()
    for key, rows in old.items():
        assert torch.equal(grown[key][:2], rows) and grown[key].shape[0] == 3, key
        assert torch.equal(shrunk[key], rows[1:]), key


def test_a_registered_uniform_router_works_through_upcycle_extend_remove_and_a_checkpoint(uniform, tmp_path):
    torch.manual_seed(0)
    seed, a, b, c = (Transformer(tiny()) for _ in range(4))
    moe = upcycle(seed, [a, b], router=uniform, expert_names=["a", "b"], attention_experts="full")
    assert moe.domain_embeddings is None
    moe = remove_expert(extend(moe, c, name="c", linear_router="reset"), "a")
    assert moe.config.moe.expert_names == ["b", "c"]
    for i, block in enumerate(moe.blocks):  # expert c's FFN is now routed expert 1
        assert torch.equal(block.ffn.experts.w_in[1], c.state_dict()[f"blocks.{i}.ffn.w_in.weight"])
    out = moe.eval()(torch.randint(0, 96, (2, 16)))
    for info in [*out.routing, *out.attention_routing]:
        torch.testing.assert_close(info.probs, torch.full_like(info.probs, 0.5))  # 1/n, n = 2
    counts = parameter_counts(moe)
    assert counts["active_inference"] == counts["active_training"]  # nothing to precompute
    save_checkpoint(moe, tmp_path / "moe")
    again = load_checkpoint(tmp_path / "moe")
    assert again.config.moe.router == uniform
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in moe.state_dict().items())
