"""The SwiGLU feed-forward network: dense FFN, shared expert and Nexus router projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`SwiGLU(a ‖ b) = SiLU(a) ⊙ b`: R^{2p} -> R^p (Shazeer, 2020). `h` holds gate then up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """`FFN(x) = W_out · SwiGLU(W_in · x)`, with W_in the gate and up projections fused.

    Also the Nexus router's projection `P_r(d) = W2 · SwiGLU(W1 · d)` (different sizes)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int | None = None) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim_in, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim_out or dim_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))
