"""Attention experts (BAM, Zhang et al. 2024, arXiv 2408.08274): the dense experts' attention upcycled
into a Mixture of Attention instead of being averaged.

    Attn(x) = [Attn_s(x) +] Σ_e g_e(x) · Attn_e(x)
    Attn_e(x) = W_o,e · SDPA(W_q,e x, W_k,e x, W_v,e x)        variant `full`
    Attn_e(x) = W_o,e · SDPA(W_q,e x, W_k x,   W_v x)          variant `shared_kv` (K, V averaged)

The gates come from an attention router of the block's own, `s = softmax(x · [a_1 … a_n])`: a Nexus
router (`a_i = P_a(d_i)`, its own projection of the same domain embeddings) or a linear one, whichever
the FFN uses. Soft routing (BAM's choice) weighs every expert by `s_e`; top-k keeps the k most
probable ones, renormalised (`attention_gates`). `Attn_s` is the optional always-on shared expert
(the seed's attention), the counterpart of the shared FFN expert.

No Python loop over experts: one GEMM projects the queries of every expert (and, `full`, their keys
and values), one SDPA call runs over experts × heads, and the gates are folded into one output GEMM,
`Σ_e g_e W_o,e y_e = [W_o,1 … W_o,n] · [g_1 y_1; …; g_n y_n]`. Top-k routing computes every expert
too: each expert's keys and values are needed at every position (a later token routed to e attends
to all earlier tokens through K_e, V_e), so only the queries and outputs could be sparse.

KV cache: `full` caches every expert's keys and values (n, or n + 1 with the shared expert, times the
dense cache); `shared_kv` caches one set, exactly the dense model's (`kv_cache_heads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nexus.config import ModelConfig
from nexus.model.attention import causal_attention
from nexus.model.moe import RoutingInfo, load_balance_loss, router_z_loss
from nexus.model.routers import Router, get_router, routing_probs

if TYPE_CHECKING:
    from nexus.model.transformer import LayerCache, RotaryEmbedding

DENSE_NAMES = {
    "wq": "wq.weight",
    "wk": "wk.weight",
    "wv": "wv.weight",
    "wo": "wo.weight",
    "bq": "wq.bias",
    "bk": "wk.bias",
    "bv": "wv.bias",
}
"""Stacked expert tensor (`attn.experts.<name>`, one slice per expert) -> the dense attention tensor
(`attn.<name>`) it is upcycled from; the shared expert (`attn.shared.<name>`) keeps the dense names."""
STACKED_BIASES = ("attn.experts.bq", "attn.experts.bk", "attn.experts.bv")


def has_attention_experts(config: ModelConfig) -> bool:
    return config.moe is not None and config.moe.has_attention_experts


def kv_cache_heads(config: ModelConfig) -> int:
    """Key/value heads one layer of a KV cache holds: the dense model's, times the number of attention
    experts with keys and values of their own (variant `full`, the shared expert included)."""
    if not has_attention_experts(config) or config.moe.attention_experts != "full":
        return config.kv_heads
    return config.kv_heads * (config.moe.n_experts + int(config.moe.attention_shared_expert))


def attention_gates(probs: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft routing `g = s` (every attention expert, BAM), or top-k `g_e = s_e / Σ_{j ∈ TopK(s)} s_j`
    for e ∈ TopK(s) and 0 otherwise: either way `Σ_e g_e = 1`, so a mixture of identical experts is
    the dense attention.

    probs: (tokens, n) -> gates (tokens, n), expert_index (tokens, k): the experts by decreasing
    probability (k = n for soft routing)."""
    top, index = probs.topk(probs.shape[-1] if top_k is None else top_k, dim=-1)
    if top_k is None:
        return probs, index
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True)), index


class SharedAttentionExpert(nn.Module):
    """The always-on attention expert: the seed's query and output projections (and, in the `full`
    variant, its key and value projections), under the dense attention's names."""

    def __init__(self, config: ModelConfig, own_kv: bool) -> None:
        super().__init__()
        d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, config.kv_heads * config.head_dim
        self.wq = nn.Linear(d, q_dim, bias=config.qkv_bias)
        if own_kv:
            self.wk = nn.Linear(d, kv_dim, bias=config.qkv_bias)
            self.wv = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, d, bias=False)

    def tensor(self, name: str) -> torch.Tensor | None:
        """The tensor stacked as `attn.experts.<name>` (see DENSE_NAMES), e.g. `bq` -> wq.bias."""
        module, attr = DENSE_NAMES[name].split(".")
        return getattr(getattr(self, module), attr)


class AttentionExperts(nn.Module):
    """n attention experts (stacked in `experts`: wq (n, H·D, d), wo (n, d, H·D), and for `full`
    wk, wv (n, G·D, d); biases bq, bk, bv with `qkv_bias`), the shared K/V projection `wk`, `wv`
    (`shared_kv`), an optional shared expert and the attention router."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        if moe is None or not moe.has_attention_experts:
            raise ValueError("AttentionExperts needs config.moe.attention_experts = 'full' or 'shared_kv'")
        n, d = moe.n_experts, config.d_model
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.full = moe.attention_experts == "full"
        self.top_k = moe.attention_top_k if moe.attention_routing == "top_k" else None
        self.load_balance_coef, self.z_loss_coef = moe.load_balance_coef, moe.z_loss_coef
        q_dim, kv_dim = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
        shapes = {"wq": (n, q_dim, d), "wo": (n, d, q_dim)}
        if self.full:
            shapes.update(wk=(n, kv_dim, d), wv=(n, kv_dim, d))
        if config.qkv_bias:
            shapes.update(bq=(n, q_dim), **({"bk": (n, kv_dim), "bv": (n, kv_dim)} if self.full else {}))
        self.experts = nn.ParameterDict({k: nn.Parameter(torch.empty(s)) for k, s in shapes.items()})
        for name, p in self.experts.items():
            if name.startswith("b"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=config.init_std)
        if not self.full:  # one key/value projection for every expert, named as in the dense attention
            self.wk = nn.Linear(d, kv_dim, bias=config.qkv_bias)
            self.wv = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.shared = SharedAttentionExpert(config, own_kv=self.full) if moe.attention_shared_expert else None
        self.router: Router = get_router(moe.router).from_config(d, n, moe)

    @property
    def n_slots(self) -> int:
        """Attention experts a token's output mixes: the routed ones, plus the shared one."""
        return self.experts["wq"].shape[0] + (self.shared is not None)

    def _slots(self, name: str) -> torch.Tensor | None:
        """`experts.<name>` with the shared expert's tensor first when there is one: (slots, ...)."""
        if name not in self.experts:
            return None
        stacked = self.experts[name]
        if self.shared is None:
            return stacked
        return torch.cat([self.shared.tensor(name).unsqueeze(0).to(stacked.dtype), stacked])

    def forward(
        self,
        h: torch.Tensor,
        rope: RotaryEmbedding,
        domain_embeddings: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, RoutingInfo]:
        """h: (B, T, d_model) normalised block input -> (Attn(h): (B, T, d_model), RoutingInfo)."""
        B, T, d = h.shape
        logits, probs = routing_probs(h.reshape(-1, d), self.router(domain_embeddings))
        gates, expert_index = attention_gates(probs, self.top_k)
        y = self.mix(h, rope, gates.view(B, T, -1), cache)
        lb = load_balance_loss(probs, expert_index)
        z = router_z_loss(logits) if self.z_loss_coef > 0 else lb.new_zeros(())
        # soft routing computes every expert for every token: nothing to balance
        aux = (self.load_balance_coef * lb if self.top_k is not None else 0.0) + self.z_loss_coef * z
        return y, RoutingInfo(expert_index, probs, lb, z, aux)

    def mix(
        self, h: torch.Tensor, rope: RotaryEmbedding, gates: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """`[Attn_s(h) +] Σ_e g_e · Attn_e(h)` for given gates: (B, T, n_experts)."""
        B, T, d = h.shape
        S, H, G, D = self.n_slots, self.n_heads, self.kv_heads, self.head_dim
        start = cache.start if cache is not None else 0
        if self.shared is not None:
            gates = torch.cat([gates.new_ones(B, T, 1), gates], dim=-1)
        bq = self._slots("bq")
        q = F.linear(
            h, self._slots("wq").flatten(0, 1), None if bq is None else bq.flatten()
        )  # (B, T, S·H·D)
        if self.full:  # expert-major heads: query head s·H + j reads key/value head s·G + j // (H/G)
            bk, bv = self._slots("bk"), self._slots("bv")
            k = F.linear(h, self._slots("wk").flatten(0, 1), None if bk is None else bk.flatten())
            v = F.linear(h, self._slots("wv").flatten(0, 1), None if bv is None else bv.flatten())
            q = q.view(B, T, S * H, D).transpose(1, 2)
            k, v = (t.view(B, T, S * G, D).transpose(1, 2) for t in (k, v))
        else:  # head-major: query head j·S + s reads the shared key/value head j // (H/G)
            q = q.view(B, T, S, H, D).permute(0, 3, 2, 1, 4).reshape(B, H * S, T, D)
            k, v = (t.view(B, T, G, D).transpose(1, 2) for t in (self.wk(h), self.wv(h)))
        q, k = rope(q, start), rope(k, start)
        if cache is not None:
            cached_k, cached_v = cache.append(k, v)
            if start:  # a prefill attends to its own k, v only: exactly the uncached computation
                k, v = cached_k, cached_v
        y = causal_attention(q, k, v, start)
        y = (
            y.view(B, S, H, T, D).permute(0, 3, 1, 2, 4)
            if self.full
            else y.view(B, H, S, T, D).permute(0, 3, 2, 1, 4)
        )
        y = y * gates.to(y.dtype)[..., None, None]  # (B, T, S, H, D)
        wo = self._slots("wo")  # (S, d, H·D) -> [W_o,1 … W_o,S]: (d, S·H·D)
        return F.linear(y.reshape(B, T, S * H * D), wo.permute(1, 0, 2).reshape(d, S * H * D))
