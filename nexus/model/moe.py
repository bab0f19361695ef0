"""The MoE FFN layer: one always-on shared expert plus n routed experts, top-k, dropless.

    y = FFN_s(x) + Σ_{k ∈ TopK(s)} s_k · FFN_ek(x)          (paper §3)

Dispatch sorts the (token, expert) assignments by expert once, gathers the tokens into one
contiguous buffer, runs each expert once on its slice, and scatters the gated results back with
`index_add_`. No per-expert mask over all tokens and no token is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nexus.config import MoEConfig
from nexus.model.ffn import FeedForward, swiglu
from nexus.model.routers import LinearRouter, NexusRouter, routing_probs


@dataclass
class RoutingInfo:
    """What one MoE layer did with one batch of tokens."""

    expert_index: torch.Tensor
    """(tokens, top_k) chosen experts."""
    probs: torch.Tensor
    """(tokens, n_experts) router probabilities, fp32."""
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    """`load_balance_coef · load_balance_loss + z_loss_coef · z_loss`."""


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss `n · Σ_i f_i · P_i` (Fedus et al., 2022), where `f_i` is the
    share of routing assignments sent to expert i and `P_i` its mean router probability; 1.0 when
    perfectly balanced. probs: (tokens, n), expert_index: (tokens, k)."""
    n = probs.shape[-1]
    counts = torch.bincount(expert_index.flatten(), minlength=n).to(probs.dtype)
    f = counts / expert_index.numel()
    return n * torch.sum(f * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss `mean(logsumexp(logits)^2)` (Zoph et al., 2022): keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class RoutedExperts(nn.Module):
    """n SwiGLU experts stored stacked: w_in (n, 2·ffn_hidden, d_model), w_out (n, d_model, ffn_hidden)."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, dispatch: str = "sorted") -> None:
        super().__init__()
        self.dispatch = dispatch
        self.w_in = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: (assignments, d_model) grouped by expert; counts: (n,) rows per expert."""
        if self.dispatch == "grouped_mm":
            return self._grouped_mm(x_sorted, counts)
        # Unbind once: indexing w[e] inside the loop makes backward quadratic in n_experts.
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        chunks = x_sorted.split(counts.tolist())
        out = [F.linear(swiglu(F.linear(c, w_in[e])), w_out[e]) for e, c in enumerate(chunks) if c.shape[0]]
        return torch.cat(out) if out else x_sorted.new_zeros(x_sorted.shape)

    def _grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in one grouped GEMM per projection (CUDA; `torch._grouped_mm`)."""
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_sorted, self.w_in.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(swiglu(h), self.w_out.transpose(-2, -1), offs=offs)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, ffn_hidden: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = FeedForward(d_model, ffn_hidden) if config.shared_expert else None
        self.experts = RoutedExperts(config.n_experts, d_model, ffn_hidden, config.dispatch)
        self.router: LinearRouter | NexusRouter
        if config.router == "nexus":
            self.router = NexusRouter(d_model, config.domain_embed_dim, config.router_hidden)
        else:
            self.router = LinearRouter(d_model, config.n_experts)

    def forward(self, x: torch.Tensor, domain_embeddings: torch.Tensor | None = None):
        """x: (tokens, d_model) -> (y: (tokens, d_model), RoutingInfo)."""
        cfg = self.config
        logits, probs = routing_probs(x, self.router(domain_embeddings))
        gates, expert_index = probs.topk(cfg.top_k, dim=-1)  # (tokens, k)
        if cfg.normalize_gates:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        flat_expert = expert_index.flatten()  # assignment a = token · k + j
        order = flat_expert.argsort(stable=True)
        token_of = order // cfg.top_k
        counts = torch.bincount(flat_expert, minlength=cfg.n_experts)
        y_sorted = self.experts(x.index_select(0, token_of), counts)
        y_sorted = y_sorted * gates.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, y_sorted)
        if self.shared is not None:
            y = y + self.shared(x)

        lb = load_balance_loss(probs, expert_index)
        z = router_z_loss(logits) if cfg.z_loss_coef > 0 else lb.new_zeros(())
        aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z
        return y, RoutingInfo(expert_index, probs, lb, z, aux)
