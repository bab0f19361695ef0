"""Model components: transformer blocks, the MoE layer and its routers."""

from nexus.model.attention_experts import AttentionExperts, attention_gates
from nexus.model.ffn import FeedForward, swiglu
from nexus.model.moe import MoELayer, RoutedExperts, RoutingInfo, load_balance_loss, router_z_loss
from nexus.model.params import parameter_counts
from nexus.model.routers import LinearRouter, NexusRouter, routing_probs
from nexus.model.transformer import ModelOutput, Transformer, causal_lm_loss

__all__ = [
    "AttentionExperts",
    "FeedForward",
    "LinearRouter",
    "MoELayer",
    "ModelOutput",
    "NexusRouter",
    "RoutedExperts",
    "RoutingInfo",
    "Transformer",
    "attention_gates",
    "causal_lm_loss",
    "load_balance_loss",
    "parameter_counts",
    "router_z_loss",
    "routing_probs",
    "swiglu",
]
