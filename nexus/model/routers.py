"""Router variants, all in this module: each router produces the router matrix `E: (n_experts, d_model)`,
and the MoE layer (and the attention experts) route with `softmax(x · Eᵀ)` in one matmul (`routing_probs`).

- `LinearRouter` (BTX baseline): E is a free parameter `W_r`, trained from scratch.
- `NexusRouter`: E is generated from the domain embeddings by a learned projection,
  `e_i = W2 · SwiGLU(W1 · d_i)`. No parameter depends on the number of experts, so an expert
  can be appended (or removed) by appending (or removing) its `d_i`.

A router kind is a `Router` subclass registered in `ROUTERS` under the name `MoEConfig.router` takes
(litgpt resolves `mlp_class_name` the same way: a config string names a class). The class attributes
tell the rest of the code what it needs to know, so nothing outside this module compares router names:
the model, `upcycle` / `extend` / `remove_expert` (`has_expert_rows`), parameter counts, interop.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from nexus.errors import ConfigError
from nexus.model.ffn import FeedForward

if TYPE_CHECKING:
    from nexus.config import MoEConfig


def routing_probs(x: torch.Tensor, router_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = softmax(x · [e_1 … e_n])` (paper §3, "Routing probabilities").

    x: (tokens, d_model), router_matrix: (n_experts, d_model) -> (logits, probs), each (tokens, n),
    probs in at least fp32 for a stable softmax under bf16."""
    logits = x @ router_matrix.to(x.dtype).t()
    return logits, logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


_ROUTER_KEY = re.compile(r"^blocks\.\d+\.(?:ffn|attn)\.router\.(.+)$")


def router_param(key: str) -> str | None:
    """The name inside its router of state-dict tensor `key` (`blocks.0.ffn.router.weight` -> `weight`),
    or None when `key` is not a router's."""
    match = _ROUTER_KEY.match(key)
    return match.group(1) if match else None


class Router(nn.Module):
    """One router kind: subclass it, implement `forward` and `from_config`, add it to `ROUTERS`.

    The class attributes describe what the model and the upcycling operations do for it:
    - `uses_domain_embeddings`: the model holds `domain_embeddings` (n_experts, m), one row per routed
      expert, and passes them to `forward`; `upcycle` and `extend` then require them;
    - `expert_rows`: its parameters with one row per routed expert (dim 0): `extend` keeps the trained
      rows and appends a freshly initialised one, `remove_expert` drops the expert's row; every other
      router parameter is copied whole;
    - `resettable`: `extend(..., linear_router="reset")` re-draws the FFN router whole (the paper's
      linear baseline, §5.2) instead of keeping its trained values;
    - `description`: one line for model cards.
    """

    uses_domain_embeddings: ClassVar[bool] = False
    expert_rows: ClassVar[tuple[str, ...]] = ()
    resettable: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @classmethod
    def from_config(cls, d_model: int, n_experts: int, moe: MoEConfig) -> Router:
        """The router of one MoE layer (FFN or attention experts) with inputs of size `d_model`."""
        raise NotImplementedError

    def forward(self, domain_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """-> E: (n_experts, d_model)."""
        raise NotImplementedError

    def precompute(self, domain_embeddings: torch.Tensor | None = None) -> None:
        """Freeze E for inference; nothing to do when E costs nothing to produce."""

    def inference_size(self, n_experts: int, d_model: int) -> int:
        """Values the router holds at inference, after `precompute`: by default its parameters."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def has_expert_rows(cls, key: str) -> bool:
        """Whether state-dict tensor `key` has one row per routed expert (dim 0) because of this router:
        one of its `expert_rows` parameters, or the domain embeddings it reads."""
        if key == "domain_embeddings":
            return cls.uses_domain_embeddings
        return router_param(key) in cls.expert_rows


class LinearRouter(Router):
    """`s = softmax(W_rᵀ x)`, `W_r ∈ R^{h×n}` (stored as (n, h), one row per expert)."""

    expert_rows = ("weight",)
    resettable = True
    description = "linear (a learned matrix)"

    def __init__(self, d_model: int, n_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters()

    @classmethod
    def from_config(cls, d_model: int, n_experts: int, moe: MoEConfig) -> LinearRouter:
        return cls(d_model, n_experts)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, domain_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight

    def precompute(self, domain_embeddings: torch.Tensor | None = None) -> None:
        """A linear router is already a plain matrix."""


class NexusRouter(Router):
    """Per MoE block, a 2-layer SwiGLU MLP `P_r: R^m -> R^h` mapping domain to expert embeddings.

    `precompute(D)` evaluates `E = P_r(D)` once and stores it, so inference costs exactly what a
    linear router costs (paper Table 3). Switching the module to training mode drops the stored
    matrix, since `P_r` is about to change."""

    uses_domain_embeddings = True
    description = (
        "Nexus: expert embeddings `e_i = W2 · SwiGLU(W1 · d_i)` generated from domain embeddings d_i"
    )

    def __init__(self, d_model: int, domain_embed_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.proj = FeedForward(domain_embed_dim, hidden or d_model, d_model)
        self.register_buffer("precomputed", None, persistent=False)

    @classmethod
    def from_config(cls, d_model: int, n_experts: int, moe: MoEConfig) -> NexusRouter:
        return cls(d_model, moe.domain_embed_dim, moe.router_hidden)

    def expert_embeddings(self, domain_embeddings: torch.Tensor) -> torch.Tensor:
        """`e_i = P_r(d_i) = W2 · SwiGLU(W1 · d_i)` (paper §3, "Domain to expert embeddings").

        domain_embeddings: (n_experts, m) -> (n_experts, d_model)."""
        return self.proj(domain_embeddings.to(self.proj.w_in.weight.dtype))

    def forward(self, domain_embeddings: torch.Tensor) -> torch.Tensor:
        if self.precomputed is not None:
            return self.precomputed
        return self.expert_embeddings(domain_embeddings)

    @torch.no_grad()
    def precompute(self, domain_embeddings: torch.Tensor) -> None:
        self.precomputed = self.expert_embeddings(domain_embeddings).detach().clone()

    def inference_size(self, n_experts: int, d_model: int) -> int:
        """Precomputed, the router is E: n·d_model values instead of its projection (paper Table 3)."""
        return n_experts * d_model

    def train(self, mode: bool = True) -> NexusRouter:
        if mode:
            self.precomputed = None
        return super().train(mode)


ROUTERS: dict[str, type[Router]] = {"nexus": NexusRouter, "linear": LinearRouter}
"""Every router kind by the name `MoEConfig.router` (and Hydra's `router.routers`) takes."""


def router_names() -> tuple[str, ...]:
    return tuple(ROUTERS)


def get_router(name: str) -> type[Router]:
    """The router kind `name`; a ConfigError listing the registered ones when there is none."""
    if name not in ROUTERS:
        *others, last = (repr(n) for n in ROUTERS)
        choices = f"{', '.join(others)} or {last}" if others else last
        raise ConfigError(f"moe.router must be {choices}, got {name!r}")
    return ROUTERS[name]
