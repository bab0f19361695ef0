"""Causal scaled-dot-product attention over heads, with or without a KV cache: the one SDPA call that
the dense attention and the attention experts (`nexus.model.attention_experts`) share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
    """`softmax(q kᵀ / sqrt(head_dim) + causal mask) v` for queries at positions start … start + T - 1.

    q: (B, q_heads, T, head_dim); k, v: (B, kv_heads, start + T, head_dim) with q_heads a multiple of
    kv_heads (query head j reads key/value head j // (q_heads / kv_heads), grouped-query attention).
    Returns (B, q_heads, T, head_dim). SDPA's `enable_gqa` reads the shared heads in place: the same
    result as repeating them (`repeat_interleave`), without the copy (~20 % faster here on CPU for 16
    query heads over 4 key/value heads, forward and backward)."""
    gqa = k.shape[1] != q.shape[1]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    T = q.shape[2]  # query t (position start + t) sees keys 0 … start + t; one new token sees them all
    mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
