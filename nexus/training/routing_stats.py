"""Routing statistics: which share of each domain's tokens each MoE layer sends to each expert
(the paper's Figures 4 and 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nexus.model.moe import RoutingInfo


def routing_counts(
    routing: Sequence[RoutingInfo], token_domains: torch.Tensor, n_domains: int
) -> torch.Tensor:
    """Top-k assignments per (layer, domain, expert): (layers, n_domains, n_experts), int64.

    token_domains: (tokens,) domain id of every routed token, in the order the layers saw them."""
    if not routing:
        return torch.zeros(0, n_domains, 0, dtype=torch.long, device=token_domains.device)
    n_experts = routing[0].probs.shape[-1]
    counts = []
    for info in routing:
        k = info.expert_index.shape[-1]
        key = token_domains.repeat_interleave(k) * n_experts + info.expert_index.flatten()
        counts.append(torch.bincount(key, minlength=n_domains * n_experts).view(n_domains, n_experts))
    return torch.stack(counts)


def share_metrics(
    counts: torch.Tensor,
    domain_names: Sequence[str],
    expert_names: Sequence[str],
    prefix: str = "val/routing",
) -> dict[str, float]:
    """`{prefix}/layer{l}/{domain}/{expert}` = share of the domain's assignments in layer l, plus
    `{prefix}/mean/{domain}/{expert}` averaged over layers; domains without tokens are skipped."""
    if counts.numel() == 0:
        return {}
    counts = counts.double().cpu()
    totals = counts.sum(-1, keepdim=True)
    shares = counts / totals.clamp_min(1)
    seen = totals[0, :, 0] > 0
    metrics: dict[str, float] = {}
    for d, domain in enumerate(domain_names):
        if not seen[d]:
            continue
        for e, expert in enumerate(expert_names):
            for layer in range(shares.shape[0]):
                metrics[f"{prefix}/layer{layer}/{domain}/{expert}"] = shares[layer, d, e].item()
            metrics[f"{prefix}/mean/{domain}/{expert}"] = shares[:, d, e].mean().item()
    return metrics
