"""Routers behind one interface: each produces the router matrix `E: (n_experts, d_model)`, and the
MoE layer routes with `softmax(x · Eᵀ)` in one matmul (`routing_probs`).

- `LinearRouter` (BTX baseline): E is a free parameter `W_r`, trained from scratch.
- `NexusRouter`: E is generated from the domain embeddings by a learned projection,
  `e_i = W2 · SwiGLU(W1 · d_i)`. No parameter depends on the number of experts, so an expert
  can be appended (or removed) by appending (or removing) its `d_i`.
"""

from __future__ import annotations

import torch
from torch import nn

from nexus.model.ffn import FeedForward


def routing_probs(x: torch.Tensor, router_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = softmax(x · [e_1 … e_n])` (paper §3, "Routing probabilities").

    x: (tokens, d_model), router_matrix: (n_experts, d_model) -> (logits, probs), each (tokens, n),
    probs in at least fp32 for a stable softmax under bf16."""
    logits = x @ router_matrix.to(x.dtype).t()
    return logits, logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


class LinearRouter(nn.Module):
    """`s = softmax(W_rᵀ x)`, `W_r ∈ R^{h×n}` (stored as (n, h), one row per expert)."""

    def __init__(self, d_model: int, n_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, domain_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight

    def precompute(self, domain_embeddings: torch.Tensor | None = None) -> None:
        """A linear router is already a plain matrix."""


class NexusRouter(nn.Module):
    """Per MoE block, a 2-layer SwiGLU MLP `P_r: R^m -> R^h` mapping domain to expert embeddings.

    `precompute(D)` evaluates `E = P_r(D)` once and stores it, so inference costs exactly what a
    linear router costs (paper Table 3). Switching the module to training mode drops the stored
    matrix, since `P_r` is about to change."""

    def __init__(self, d_model: int, domain_embed_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.proj = FeedForward(domain_embed_dim, hidden or d_model, d_model)
        self.register_buffer("precomputed", None, persistent=False)

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

    def train(self, mode: bool = True) -> NexusRouter:
        if mode:
            self.precomputed = None
        return super().train(mode)
