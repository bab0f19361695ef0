"""Nexus: upcycle dense expert LMs into an extensible Mixture-of-Experts (arXiv 2408.15901).

    import nexus
    moe = nexus.upcycle(seed, [expert_a, expert_b], domain_embeddings=D, router="nexus")
"""
from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import ModelConfig, MoEConfig
from nexus.model import Transformer, parameter_counts
from nexus.upcycle import extend, merge_dense, remove_expert, sparse_upcycle, upcycle

__all__ = [
    "ModelConfig", "MoEConfig", "Transformer", "extend", "load_checkpoint", "merge_dense",
    "parameter_counts", "remove_expert", "save_checkpoint", "sparse_upcycle", "upcycle",
]
__version__ = "0.1.0"
