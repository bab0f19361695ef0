"""Nexus decoder (arXiv 2408.15901) for transformers, as exported by `nexus export`.

RMSNorm, rotary embeddings (rotate-half), grouped-query SDPA attention, SwiGLU, no biases but optional
q/k/v ones. Blocks are parallel, `x + Attn(norm(x)) + FFN(norm(x))` (the paper's), or sequential
(Llama). The FFN is dense, or a Mixture of Experts per block:

    y = FFN_s(x) + Σ_{k ∈ TopK(s)} s_k · FFN_ek(x),    s = softmax(x · [e_1 … e_n])

with the always-on shared expert FFN_s optional, the top-k gates renormalised iff `norm_topk_prob`,
and the router matrix E = [e_1 … e_n] either a free matrix (`mlp.gate`, "linear") or generated from
the domain embeddings d_i (`model.domain_embeddings`) by each block's projection
`e_i = W2 · SwiGLU(W1 · d_i)` (`mlp.router`, "nexus"). Shipping d_i and the projection rather than E
keeps the model extensible: a new expert is a new d_i (see the model card and docs/interop.md).

With attention experts (BAM, arXiv 2408.08274; `attention_experts` "full" or "shared_kv"), a block's
attention is `Σ_e g_e · Attn_e(x)` over one attention expert per routed expert (plus the optional
shared one), routed by an attention router of its own (`self_attn.gate` or `self_attn.router`).

Every operation mirrors `nexus.model.Transformer` in the same order and precision, so the logits
match the Nexus checkpoint's. Generation uses transformers' `Cache` (`DynamicCache` by default).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nexus import NexusConfig


class NexusRMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * w`, computed in fp32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos, sin of the rotary angles at `position_ids` (B, T): each (B, 1, T, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class NexusMLP(nn.Module):
    """SwiGLU `down_proj(SiLU(gate) ⊙ up)` with `[gate; up] = gate_up_proj(x)` (one fused matrix)."""

    def __init__(self, dim_in, hidden, dim_out=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim_in, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim_out or dim_in, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class NexusExperts(nn.Module):
    """n SwiGLU experts, stacked: gate_up_proj (n, 2·f, d), down_proj (n, d, f)."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def expert(self, e, x):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])


class NexusSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, n = config.hidden_size, config.num_experts
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.shared_expert = NexusMLP(d, config.intermediate_size) if config.shared_expert else None
        self.experts = NexusExperts(n, d, config.intermediate_size)
        if config.router == "nexus":  # P_r: R^m -> R^d, e_i = P_r(d_i)
            self.router = NexusMLP(config.domain_embed_dim, config.router_hidden_size or d, d)
        else:
            self.gate = nn.Linear(d, n, bias=False)

    def router_matrix(self, domain_embeddings):
        """E: (n_experts, hidden): the linear router's matrix, or `e_i = W2 · SwiGLU(W1 · d_i)`."""
        if hasattr(self, "gate"):
            return self.gate.weight
        return self.router(domain_embeddings.to(self.router.gate_up_proj.weight.dtype))

    def forward(self, hidden_states, domain_embeddings=None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = x @ self.router_matrix(domain_embeddings).to(x.dtype).t()
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        gates, index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        y = self.shared_expert(x) if self.shared_expert is not None else x.new_zeros(x.shape)
        for e in range(self.experts.gate_up_proj.shape[0]):  # in expert order, as Nexus adds them
            token, slot = torch.where(index == e)
            if token.numel():
                out = self.experts.expert(e, x[token])
                y.index_add_(0, token, out * gates[token, slot].unsqueeze(-1).to(out.dtype))
        return y.view(shape), logits


class NexusAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NexusStackedAttention(nn.Module):
    """n attention experts' projections, stacked: q_proj (n, H·D, d), o_proj (n, d, H·D); with their own
    keys and values k_proj, v_proj (n, G·D, d); q/k/v biases (n, ·) with `qkv_bias`."""

    def __init__(self, config, n_experts, own_kv):
        super().__init__()
        d, q_dim = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim
        shapes = {"q_proj": (n_experts, q_dim, d), "o_proj": (n_experts, d, q_dim)}
        if own_kv:
            shapes.update(k_proj=(n_experts, kv_dim, d), v_proj=(n_experts, kv_dim, d))
        if config.qkv_bias:
            shapes.update(q_bias=(n_experts, q_dim))
            if own_kv:
                shapes.update(k_bias=(n_experts, kv_dim), v_bias=(n_experts, kv_dim))
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape)))


class NexusSharedAttentionExpert(nn.Module):
    """The always-on attention expert: q_proj, o_proj (and k_proj, v_proj with keys and values of its own)."""

    def __init__(self, config, own_kv):
        super().__init__()
        d, bias = config.hidden_size, config.qkv_bias
        q_dim, kv_dim = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        )
        self.q_proj = nn.Linear(d, q_dim, bias=bias)
        if own_kv:
            self.k_proj = nn.Linear(d, kv_dim, bias=bias)
            self.v_proj = nn.Linear(d, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, d, bias=False)


class NexusAttentionExperts(nn.Module):
    """Attention experts (BAM, arXiv 2408.08274): `Attn(x) = [Attn_s(x) +] Σ_e g_e · Attn_e(x)` with
    `g = softmax(x · A)` (soft) or its top-k entries renormalised; `Attn_e` uses expert e's Q, O and its
    own K, V ("full") or the one shared K, V ("shared_kv"). All experts × heads in one SDPA call."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        d, n = config.hidden_size, config.num_experts
        self.n_heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.full = config.attention_experts == "full"
        self.top_k = config.attention_top_k if config.attention_routing == "top_k" else None
        self.experts = NexusStackedAttention(config, n, self.full)
        if not self.full:
            kv_dim = self.kv_heads * self.head_dim
            self.k_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
            self.v_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.shared_expert = (
            NexusSharedAttentionExpert(config, self.full) if config.attention_shared_expert else None
        )
        if config.router == "nexus":  # P_a: R^m -> R^d, a_i = P_a(d_i)
            self.router = NexusMLP(config.domain_embed_dim, config.router_hidden_size or d, d)
        else:
            self.gate = nn.Linear(d, n, bias=False)

    router_matrix = NexusSparseMoeBlock.router_matrix

    def _slots(self, proj, kind="proj"):
        """The stacked `{proj}_{kind}` of the experts, the shared expert's first: (slots, ...), or None."""
        stacked = getattr(self.experts, f"{proj}_{kind}", None)
        if stacked is None or self.shared_expert is None:
            return stacked
        linear = getattr(self.shared_expert, f"{proj}_proj")
        shared = linear.weight if kind == "proj" else linear.bias
        return torch.cat([shared.unsqueeze(0).to(stacked.dtype), stacked])

    def _project(self, x, proj):
        bias = self._slots(proj, "bias")
        return F.linear(x, self._slots(proj).flatten(0, 1), None if bias is None else bias.flatten())

    def forward(self, x, cos, sin, mask, is_causal, cache=None, domain_embeddings=None):
        B, T, d = x.shape
        logits = x.reshape(-1, d) @ self.router_matrix(domain_embeddings).to(x.dtype).t()
        gates = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        if self.top_k is not None:
            top, index = gates.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
        gates = gates.view(B, T, -1)
        if self.shared_expert is not None:
            gates = torch.cat([gates.new_ones(B, T, 1), gates], dim=-1)
        S, H, G, D = gates.shape[-1], self.n_heads, self.kv_heads, self.head_dim
        q = self._project(x, "q")
        if self.full:  # expert-major heads
            q = q.view(B, T, S * H, D).transpose(1, 2)
            k = self._project(x, "k").view(B, T, S * G, D).transpose(1, 2)
            v = self._project(x, "v").view(B, T, S * G, D).transpose(1, 2)
        else:  # head-major: query head j·S + s reads the shared key/value head j // (H/G)
            q = q.view(B, T, S, H, D).permute(0, 3, 2, 1, 4).reshape(B, H * S, T, D)
            k = self.k_proj(x).view(B, T, G, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, G, D).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        if self.full:
            y = y.view(B, S, H, T, D).permute(0, 3, 1, 2, 4)
        else:
            y = y.view(B, H, S, T, D).permute(0, 3, 2, 1, 4)
        y = y * gates.to(y.dtype)[..., None, None]
        wo = self._slots("o")
        return F.linear(y.reshape(B, T, S * H * D), wo.permute(1, 0, 2).reshape(d, S * H * D))


class NexusDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel = config.parallel_blocks
        self.input_layernorm = NexusRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_experts and getattr(config, "attention_experts", "none") != "none":
            self.self_attn = NexusAttentionExperts(config, layer_idx)
        else:
            self.self_attn = NexusAttention(config, layer_idx)
        if not self.parallel:
            self.post_attention_layernorm = NexusRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_experts:
            self.mlp = NexusSparseMoeBlock(config)
        else:
            self.mlp = NexusMLP(config.hidden_size, config.intermediate_size)

    def _mlp(self, h, domain_embeddings):
        if isinstance(self.mlp, NexusSparseMoeBlock):
            return self.mlp(h, domain_embeddings)[0]
        return self.mlp(h)

    def _attn(self, h, cos, sin, mask, is_causal, cache, domain_embeddings):
        if isinstance(self.self_attn, NexusAttentionExperts):
            return self.self_attn(h, cos, sin, mask, is_causal, cache, domain_embeddings)
        return self.self_attn(h, cos, sin, mask, is_causal, cache)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, domain_embeddings=None):
        h = self.input_layernorm(x)
        a = self._attn(h, cos, sin, mask, is_causal, cache, domain_embeddings)
        if self.parallel:  # x + Attn(norm(x)) + FFN(norm(x))
            return x + a + self._mlp(h, domain_embeddings)
        x = x + a
        return x + self._mlp(self.post_attention_layernorm(x), domain_embeddings)


class NexusPreTrainedModel(PreTrainedModel):
    config_class = NexusConfig
    base_model_prefix = "model"
    _no_split_modules = ["NexusDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, NexusExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        if isinstance(module, NexusStackedAttention):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(param)
                else:
                    init.normal_(param, mean=0.0, std=std)


def _attention_mask(attention_mask, batch, q_len, past, device):
    """(mask, is_causal) for SDPA. Without padding the causal mask is implicit (`is_causal`, or none for
    one new token); with a 2D padding mask (batch, past + q_len), a boolean (batch, 1, q_len, kv_len)
    mask where every query sees at least itself (padding rows stay finite)."""
    kv_len = past + q_len
    padded = attention_mask is not None and (attention_mask.dim() != 2 or not bool(attention_mask.all()))
    if not padded:
        if past == 0:
            return None, q_len > 1
        if q_len == 1:
            return None, False
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(past)
    mask = mask.expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        keys = attention_mask[:, -kv_len:].bool()[:, None, None, :]
        own = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
        own[torch.arange(q_len), past + torch.arange(q_len)] = True
        mask = (mask & keys) | own
    return mask, False


class NexusModel(NexusPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NexusDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NexusRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_experts and config.router == "nexus":  # d_i, one row per routed expert
            self.register_buffer(
                "domain_embeddings", torch.zeros(config.num_experts, config.domain_embed_dim)
            )
        else:
            self.domain_embeddings = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.config)
        B, T = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0)
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype
        )
        mask, is_causal = _attention_mask(attention_mask, B, T, past, inputs_embeds.device)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache, self.domain_embeddings)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache if use_cache else None}
        )


_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NexusForCausalLM(NexusPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = NexusModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["NexusForCausalLM", "NexusModel", "NexusPreTrainedModel"]
