"""Cross-entropy over a large vocabulary without materialising the logits.

    loss = (1/N) Σ_t [logsumexp(h_t · Wᵀ) − h_t · w_{y_t}]        (over targets y_t ≠ ignore_index)

At paper size the logits of one batch are 32 × 2048 × 256k: 33 GB in bf16, twice that as fp32 for
the softmax. `chunked_cross_entropy` computes the loss `chunk` tokens at a time and keeps only one
fp32 logsumexp per token; its backward recomputes each chunk's logits, so peak memory is
O(chunk · vocab) instead of O(tokens · vocab). The softmax runs in fp32 whatever the GEMM dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _logits(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits from a GEMM in `dtype`, in at least fp32 (fp64 stays fp64)."""
    return (h.to(dtype) @ weight.to(dtype).t()).to(torch.promote_types(dtype, torch.float32))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token NLL (fp32) of `h @ weightᵀ`, `chunk` rows at a time; see `chunked_cross_entropy`."""

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        ignore_index: int,
        dtype: torch.dtype,
    ):
        nll = torch.empty(h.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        lse = torch.empty_like(nll)
        valid = targets != ignore_index
        safe = targets.where(valid, 0)
        for r0 in range(0, h.shape[0], chunk):
            logits = _logits(h[r0 : r0 + chunk], weight, dtype)
            lse[r0 : r0 + chunk] = logits.logsumexp(-1)
            target_logit = logits.gather(1, safe[r0 : r0 + chunk, None]).squeeze(1)
            nll[r0 : r0 + chunk] = lse[r0 : r0 + chunk] - target_logit
        nll = nll.where(valid, 0.0)
        ctx.save_for_backward(h, weight, safe, valid, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor):
        h, weight, safe, valid, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        scale = grad_nll.to(lse.dtype).where(valid, 0.0)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for r0 in range(0, h.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            # d nll / d logits = softmax − onehot(target), times the upstream gradient of each row
            g = _logits(h[rows], weight, dtype).sub_(lse[rows, None]).exp_()
            g.scatter_add_(1, safe[rows, None], -torch.ones_like(g[:, :1]))
            g.mul_(scale[rows, None])
            g_low = g.to(dtype)
            if grad_h is not None:
                grad_h[rows] = (g_low @ weight.to(dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += g_low.t() @ h[rows].to(dtype)  # accumulated over chunks in fp32 (or fp64)
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy of logits `hidden @ weightᵀ` computed `chunk` tokens at a time.

    hidden: (..., d_model) LM-head inputs; weight: (vocab, d_model); targets: (...) ids, aligned with
    `hidden`. chunk 0: all tokens in one chunk (through `F.cross_entropy`). The GEMMs follow autocast
    (bf16 under bf16-mixed), the log-softmax is fp32. reduction: "mean" over non-ignored targets,
    "sum", or "none" (per-token fp32 NLL, 0 at ignored targets)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    if chunk <= 0 or chunk >= h.shape[0]:
        with torch.autocast(device_type, enabled=False):
            nll = F.cross_entropy(
                _logits(h, weight, dtype), y, ignore_index=ignore_index, reduction=reduction
            )
        return nll.view(targets.shape) if reduction == "none" else nll
    else:
        with torch.autocast(device_type, enabled=False):
            nll = ChunkedCrossEntropy.apply(h, weight, y, chunk, ignore_index, dtype)
    if reduction == "none":
        return nll.view(targets.shape)
    total = nll.sum()
    return total if reduction == "sum" else total / (y != ignore_index).sum().clamp_min(1)
