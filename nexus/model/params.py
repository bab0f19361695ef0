"""Parameter accounting in the form of the paper's Table 3 (total / active in training / inference)."""

from __future__ import annotations

from torch import nn

from nexus.model.attention_experts import AttentionExperts
from nexus.model.moe import MoELayer
from nexus.model.routers import Router


def _router_inference_delta(router: Router, n: int, d_model: int) -> int:
    """What precomputing the router for inference adds (a Nexus router: E's n·d_model values instead of
    its projection; a linear router is E already: 0)."""
    return router.inference_size(n, d_model) - sum(p.numel() for p in router.parameters())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and those active for one token in training and at inference.

    A token uses the shared expert and top_k of the n routed experts. At inference a Nexus router
    is precomputed into an (n, d_model) matrix, so its projection MLP is replaced by n·d_model
    values: exactly what a linear router holds. Attention experts (BAM): with soft routing every
    attention expert is active; with top-k routing a token uses the queries and outputs of k of
    them, but the keys and values of all (later tokens routed to any expert attend to it)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = inference_delta = 0
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        n, k = layer.config.n_experts, layer.config.top_k
        per_expert = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) // n
        inactive += (n - k) * per_expert
        inference_delta += _router_inference_delta(layer.router, n, layer.experts.w_in.shape[-1])
    for attn in (m for m in model.modules() if isinstance(m, AttentionExperts)):
        n, d_model = attn.experts["wq"].shape[0], attn.experts["wq"].shape[-1]
        if attn.top_k is not None:
            per_expert = sum(attn.experts[k].numel() for k in ("wq", "wo", "bq") if k in attn.experts) // n
            inactive += (n - attn.top_k) * per_expert
        inference_delta += _router_inference_delta(attn.router, n, d_model)
    active = total - inactive
    return {"total": total, "active_training": active, "active_inference": active + inference_delta}
