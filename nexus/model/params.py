"""Parameter accounting in the form of the paper's Table 3 (total / active in training / inference)."""
from __future__ import annotations

from torch import nn

from nexus.model.moe import MoELayer
from nexus.model.routers import NexusRouter


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, and those active for one token in training and at inference.

    A token uses the shared expert and top_k of the n routed experts. At inference a Nexus router
    is precomputed into an (n, d_model) matrix, so its projection MLP is replaced by n·d_model
    values: exactly what a linear router holds."""
    total = sum(p.numel() for p in model.parameters())
    inactive = inference_delta = 0
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        n, k = layer.config.n_experts, layer.config.top_k
        per_expert = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) // n
        inactive += (n - k) * per_expert
        if isinstance(layer.router, NexusRouter):
            d_model = layer.experts.w_in.shape[-1]
            inference_delta += n * d_model - sum(p.numel() for p in layer.router.parameters())
    active = total - inactive
    return {"total": total, "active_training": active, "active_inference": active + inference_delta}
