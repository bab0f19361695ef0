"""Decoder-only transformer: RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention, no biases.

Blocks are parallel (attention and FFN read the same normalised input; the paper's choice) or
sequential (Llama), by `ModelConfig.parallel_blocks`. The FFN is dense, or an `MoELayer` when
`config.moe` is set; everything else is identical, which is what makes upcycling a weight copy.
With `config.moe.attention_experts` (BAM), the attention is a mixture of attention experts too
(`nexus.model.attention_experts.AttentionExperts`).

`forward(idx, cache=KVCache(...))` appends the keys and values of `idx` to a preallocated cache and
attends over everything cached: the prefill (empty cache) computes exactly what the uncached
forward computes, later calls feed only the new tokens (`nexus.evaluation.generation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nexus.config import ModelConfig
from nexus.model.attention import causal_attention
from nexus.model.attention_experts import (
    STACKED_BIASES,
    AttentionExperts,
    has_attention_experts,
    kv_cache_heads,
)
from nexus.model.ffn import FeedForward
from nexus.model.moe import MoELayer, RoutingInfo
from nexus.model.routers import get_router


class RMSNorm(nn.Module):
    """`y = x / sqrt(mean(x^2) + eps) * w`, computed in fp32 so bf16 activations stay accurate."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al.), in the rotate-half layout that Llama checkpoints use."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: (B, heads, T, head_dim) at positions start … start + T - 1."""
        T = x.shape[-2]
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class LayerCache:
    """One layer's slice of a `KVCache`: `start` tokens are cached already."""

    keys: torch.Tensor
    """(B, kv_heads, max_seq_len, head_dim)"""
    values: torch.Tensor
    start: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, kv_heads, T, head_dim) after the cached tokens; return all keys and values."""
        end = self.start + k.shape[2]
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer for the first `length` tokens, preallocated to `max_seq_len`
    (with attention experts of their own keys and values, every expert's: `kv_cache_heads`)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, kv_cache_heads(config), config.max_seq_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0

    def layers(self) -> list[LayerCache]:
        return [LayerCache(k, v, self.length) for k, v in zip(self.keys, self.values)]

    def bytes_per_token(self) -> int:
        """Bytes the cache holds per cached token and sequence (keys and values of every layer)."""
        total = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        return total // (self.keys[0].shape[0] * self.keys[0].shape[2])


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.d_model, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.d_model, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: LayerCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        start = cache.start if cache is not None else 0
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, start), rope(k, start)
        if cache is not None:
            cached_k, cached_v = cache.append(k, v)
            if start:  # a prefill attends to its own k, v only: exactly the uncached computation
                k, v = cached_k, cached_v
        y = causal_attention(q, k, v, start)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel = config.parallel_blocks
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn: Attention | AttentionExperts = (
            AttentionExperts(config) if has_attention_experts(config) else Attention(config)
        )
        self.ffn_norm = None if self.parallel else RMSNorm(config.d_model, config.norm_eps)
        self.ffn: FeedForward | MoELayer
        if config.moe is None:
            self.ffn = FeedForward(config.d_model, config.ffn_hidden)
        else:
            self.ffn = MoELayer(config.d_model, config.ffn_hidden, config.moe)

    def _ffn(self, h: torch.Tensor, domain_embeddings: torch.Tensor | None):
        if isinstance(self.ffn, MoELayer):
            y, info = self.ffn(h.reshape(-1, h.shape[-1]), domain_embeddings)
            return y.view_as(h), info
        return self.ffn(h), None

    def _attn(self, h: torch.Tensor, rope, domain_embeddings: torch.Tensor | None, cache: LayerCache | None):
        if isinstance(self.attn, AttentionExperts):
            return self.attn(h, rope, domain_embeddings, cache)
        return self.attn(h, rope, cache), None

    def forward(
        self, x, rope, domain_embeddings=None, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, RoutingInfo | None, RoutingInfo | None]:
        """-> (output, FFN routing, attention-expert routing); the routings are None where not routed."""
        h = self.attn_norm(x)
        a, attn_info = self._attn(h, rope, domain_embeddings, cache)
        if self.parallel:  # x + Attn(norm(x)) + FFN(norm(x))
            y, info = self._ffn(h, domain_embeddings)
            return x + a + y, info, attn_info
        x = x + a
        y, info = self._ffn(self.ffn_norm(x), domain_embeddings)
        return x + y, info, attn_info


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """(B, T, vocab); None when `forward(..., logits=False)` (the loss then comes from `hidden`)."""
    aux_loss: torch.Tensor
    """Weighted sum of the MoE auxiliary losses over layers (0 for dense models)."""
    routing: list[RoutingInfo] = field(default_factory=list)
    """Per MoE layer: which experts each token went to, with what probabilities."""
    hidden: torch.Tensor | None = None
    """(B, T, d_model) the normalised final hidden states, the LM head's input."""
    attention_routing: list[RoutingInfo] = field(default_factory=list)
    """Per layer with attention experts: the attention router's probabilities and choices."""


RESIDUAL_PROJECTIONS = (
    "attn.wo.weight",
    "ffn.w_out.weight",
    "shared.w_out.weight",
    "experts.w_out",
    "attn.experts.wo",
    "attn.shared.wo.weight",
)
"""Parameters initialised with std `init_std / sqrt(2 · n_layers)` (GPT-2)."""


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.moe is not None and get_router(config.moe.router).uses_domain_embeddings:
            # d_i of each routed expert, shared by every block's router: (n_experts, m).
            self.register_buffer(
                "domain_embeddings", torch.zeros(config.moe.n_experts, config.moe.domain_embed_dim)
            )
        else:
            self.domain_embeddings = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layers))

    @torch.no_grad()
    def reinit_(self, generator: torch.Generator) -> Transformer:
        """Draw every weight matrix again from `generator`, with `__init__`'s distributions (normal,
        `init_std`, residual projections scaled by depth). Seeded initialisation through a private
        generator cannot race with other threads on the global random state."""
        for name, p in self.named_parameters():
            if p.dim() >= 2 and not name.endswith(STACKED_BIASES):
                scale = math.sqrt(2 * self.config.n_layers) if name.endswith(RESIDUAL_PROJECTIONS) else 1.0
                p.normal_(0.0, self.config.init_std / scale, generator=generator)
        return self

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters") and not isinstance(module, Transformer):
            module.reset_parameters()

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, logits: bool = True) -> ModelOutput:
        """idx: (B, T) token ids, T <= max_seq_len; with `cache`, the tokens after the `cache.length`
        cached ones (which `idx` extends by T). `logits=False` skips the LM head (training computes the
        loss from `hidden` in chunks, never holding (B, T, vocab) logits)."""
        start = cache.length if cache is not None else 0
        if start + idx.shape[-1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {start + idx.shape[-1]} exceeds max_seq_len={self.config.max_seq_len}"
            )
        x = self.tok_emb(idx)
        routing: list[RoutingInfo] = []
        attention_routing: list[RoutingInfo] = []
        layer_caches = cache.layers() if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches):
            x, info, attn_info = block(x, self.rope, self.domain_embeddings, layer_cache)
            routing.extend([info] if info is not None else [])
            attention_routing.extend([attn_info] if attn_info is not None else [])
        if cache is not None:
            cache.length += idx.shape[-1]
        hidden = self.norm(x)
        aux = sum((r.aux_loss for r in (*routing, *attention_routing)), start=hidden.new_zeros(()))
        return ModelOutput(self.lm_head(hidden) if logits else None, aux, routing, hidden, attention_routing)

    def precompute_routers(self) -> None:
        """Freeze every router's E (a Nexus router's `E = P_r(D)`) into a plain matrix for inference; see
        `Router.precompute`."""
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                block.ffn.router.precompute(self.domain_embeddings)
            if isinstance(block.attn, AttentionExperts):
                block.attn.router.precompute(self.domain_embeddings)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V) already aligned with targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
