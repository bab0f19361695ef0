"""Routing specialization (the paper's Figures 4 and 5): for each domain's held-out tokens, per MoE
layer and expert,

    mean_prob[l, d, e] = mean over domain-d tokens of s_e(x)    (the router's softmax probability)
    top1_share[l, d, e] = share of domain-d tokens whose top-1 expert is e

and both averaged over layers (`layer_mean`). The paper's "average routing probability" figures
correspond to either view; with top-1 routing the share is what each expert actually computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nexus.evaluation.perplexity import forward_windows, stream_windows, token_array
from nexus.model.transformer import Transformer

METRICS = {"mean_prob": "mean routing probability", "top1_share": "top-1 routing share"}


@dataclass
class RoutingAnalysis:
    """Routing statistics of one model; arrays are (layers, domains, experts)."""

    domains: list[str]
    experts: list[str]
    mean_prob: np.ndarray
    top1_share: np.ndarray
    tokens: dict[str, int]

    def layer_mean(self, metric: str = "top1_share") -> np.ndarray:
        """(domains, experts): the metric averaged over layers."""
        return getattr(self, metric).mean(axis=0)

    def table(self, metric: str = "top1_share") -> list[list[Any]]:
        """Rows `[domain, value per expert..., tokens]` of the layer-averaged metric, header first."""
        values = self.layer_mean(metric)
        rows: list[list[Any]] = [["domain", *self.experts, "tokens"]]
        rows += [[d, *values[i].tolist(), self.tokens[d]] for i, d in enumerate(self.domains)]
        return rows

    def own_expert_share(self, metric: str = "top1_share") -> dict[str, float]:
        """For domains that have an expert of the same name: the layer-averaged metric of that expert."""
        values = self.layer_mean(metric)
        return {
            d: float(values[i, self.experts.index(d)])
            for i, d in enumerate(self.domains)
            if d in self.experts
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "experts": self.experts,
            "mean_prob": self.mean_prob.tolist(),
            "top1_share": self.top1_share.tolist(),
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingAnalysis:
        return cls(
            list(data["domains"]),
            list(data["experts"]),
            np.asarray(data["mean_prob"], dtype=np.float64),
            np.asarray(data["top1_share"], dtype=np.float64),
            dict(data["tokens"]),
        )


def analyze_routing(
    model: Transformer,
    splits: Mapping[str, Any],
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    expert_names: Sequence[str] | None = None,
) -> RoutingAnalysis:
    """Routing statistics of an MoE `model` over `{domain: held-out tokens}` (packed splits, arrays
    or tensors), read in training-style windows; at most `max_tokens` tokens per domain."""
    if model.config.moe is None:
        raise ValueError("routing analysis needs an MoE model (config.moe is None)")
    experts = list(expert_names or model.config.moe.expert_names)
    n_layers, n_experts = model.config.n_layers, len(experts)
    shape = (n_layers, len(splits), n_experts)
    prob_sum, top1_count = np.zeros(shape), np.zeros(shape)
    tokens: dict[str, int] = {}
    for d, (domain, split) in enumerate(splits.items()):
        ids = token_array(split)[: max_tokens + 1 if max_tokens else None]
        n = 0
        for batch in forward_windows(
            model, stream_windows(ids, seq_len or model.config.max_seq_len), batch_size
        ):
            valid = batch.valid.flatten()  # RoutingInfo rows follow the (B, T) order
            n += int(valid.sum())
            for layer, info in enumerate(batch.output.routing):
                prob_sum[layer, d] += info.probs[valid].double().sum(0).cpu().numpy()
                top1 = info.expert_index[valid, 0]
                top1_count[layer, d] += torch.bincount(top1, minlength=n_experts).cpu().numpy()
        tokens[domain] = n
    denom = np.maximum(np.array([tokens[d] for d in splits], dtype=np.float64), 1)[None, :, None]
    return RoutingAnalysis(list(splits), experts, prob_sum / denom, top1_count / denom, tokens)
