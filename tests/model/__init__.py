"""Shared builders for the model tests: tiny dense models, perturbed copies ("trained experts") and
MoEs upcycled from them."""

from __future__ import annotations

import copy

import torch

from nexus.config import tiny
from nexus.model.transformer import Transformer
from nexus.upcycling import upcycle

N = 3


def dense_model(seed: int = 0, **config) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(n_kv_heads=2, **config)).eval()


@torch.no_grad()
def perturbed(model: Transformer, seed: int, scale: float = 0.05, keep: tuple[str, ...] = ()) -> Transformer:
    """A copy with every parameter moved by N(0, scale²), except names containing one of `keep`."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for name, p in out.named_parameters():
        if not any(k in name for k in keep):
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def bam(seed: Transformer, experts: list[Transformer], router: str = "nexus", **options) -> Transformer:
    domains = (
        torch.randn(len(experts), 16, generator=torch.Generator().manual_seed(7))
        if router == "nexus"
        else None
    )
    return upcycle(seed, experts, domain_embeddings=domains, router=router, **options).eval()


@torch.no_grad()
def sharpen_routers(model: Transformer, std: float = 0.5) -> Transformer:
    """Random router weights large enough that the gates are far from uniform."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if ".router." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tokens(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(0))
