"""The paper's learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then cosine decay.

        step <  W:  (step + 1) / W
        step >= W:  r + (1 - r) · ½ (1 + cos(π · p)),   p = (step - W) / max(1, S - W), clamped to [0, 1]

    with W = `warmup_steps`, S = `total_steps`, r = `min_ratio`: peak 1 right after warmup, r at the end.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A per-step `LambdaLR` over `warmup_cosine` (its state dict holds only numbers)."""
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, min_ratio))
