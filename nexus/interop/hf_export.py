"""Export a Nexus model as a transformers directory that `AutoModelForCausalLM.from_pretrained`
loads with no custom code, computing exactly what the Nexus model computes.

- Dense (seed, expert, merged) -> `LlamaForCausalLM`.
- MoE -> `Qwen2MoeForCausalLM`. Its sparse block (transformers' modeling_qwen2_moe.py) is

      y = Σ_{k ∈ TopK(p)} g_k · FFN_ek(x) + sigmoid(w_sᵀ x) · FFN_s(x),
      p = softmax(W_g x) over all experts (fp32), g = top-k of p (renormalised iff norm_topk_prob)

  which is the Nexus layer `y = FFN_s(x) + Σ s_k · FFN_ek(x)` when `W_g = E` (the router matrix;
  for the Nexus router `E = P_r(D)`, evaluated once here), `norm_topk_prob = normalize_gates`,
  `w_s = 0` (so the sigmoid is exactly 0.5) and the shared expert's `down_proj` is doubled (a
  power-of-two scale: `0.5 · (2W) x` rounds exactly like `W x`). Without a shared expert, a
  width-1 all-zero shared expert contributes exactly 0. Qwen2-MoE's q/k/v biases are written as
  zeros; its blocks, RMSNorm, RoPE and GQA attention are Llama's.

Refused: parallel attention/FFN blocks (the paper's default), which no transformers architecture
with RMSNorm and SwiGLU computes. Training-only settings (load balancing, z-loss, dispatch) do not
affect the logits; the Nexus projection and domain embeddings are not exported (keep the Nexus
checkpoint to extend the MoE later).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nexus.checkpoint import load_checkpoint, load_model_config, read_checkpoint_config
from nexus.config import ModelConfig
from nexus.interop.hf_format import (
    CONFIG_KEYS,
    HF_CONFIG,
    LLAMA,
    QWEN2_MOE,
    SAFETENSORS,
    SPECIAL_TOKENS,
    UnsupportedModelError,
    atomic_directory,
    block_prefix,
    dense_to_hf,
    ffn_to_hf,
    non_ffn_to_hf,
    special_token_ids,
    tokenizer_files,
)
from nexus.model.moe import MoELayer
from nexus.model.transformer import Transformer


def export_architecture(config: ModelConfig) -> str:
    """The transformers architecture that represents `config` exactly, or `UnsupportedModelError`."""
    if config.parallel_blocks:
        raise UnsupportedModelError(
            "parallel attention/FFN blocks (model.parallel_blocks=true) have no exact transformers "
            f"architecture: {LLAMA} and {QWEN2_MOE} apply the FFN after the attention residual. "
            "Only models trained with parallel_blocks=false can be exported")
    return QWEN2_MOE if config.is_moe else LLAMA


def hf_config(config: ModelConfig, dtype: torch.dtype,
              special_tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The transformers `config.json` for `config` (readable by transformers 4.x and 5.x)."""
    arch = export_architecture(config)
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {hf: getattr(config, ours) for ours, hf in CONFIG_KEYS.items()}
    out.update(
        architectures=[arch], num_key_value_heads=config.kv_heads, hidden_act="silu", use_cache=True,
        rope_theta=config.rope_theta,  # transformers 4.x reads this, 5.x rope_parameters
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        dtype=dtype_name, torch_dtype=dtype_name,
        **{k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKENS},
    )
    if config.moe is None:
        out.update(model_type="llama", head_dim=config.head_dim, attention_bias=False, mlp_bias=False,
                   pretraining_tp=1)
        return out
    moe = config.moe
    out.update(
        model_type="qwen2_moe", num_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.normalize_gates, moe_intermediate_size=config.ffn_hidden,
        shared_expert_intermediate_size=config.ffn_hidden if moe.shared_expert else 1,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
        sliding_window=None, max_window_layers=config.n_layers, router_aux_loss_coef=moe.load_balance_coef,
        output_router_logits=False,
    )
    return out


def _moe_ffn_to_hf(model: Transformer, i: int, ffn: MoELayer) -> dict[str, torch.Tensor]:
    """Block i's MoE layer (and its zero attention biases) in Qwen2-MoE names; see the module doc."""
    cfg, p = model.config, block_prefix(i)
    w = ffn.experts.w_in
    zeros = w.new_zeros
    out = {f"{p}mlp.gate.weight": ffn.router(model.domain_embeddings).to(w.dtype),  # E: (n, d_model)
           f"{p}mlp.shared_expert_gate.weight": zeros(1, cfg.d_model)}  # sigmoid(0) = 0.5 exactly
    if ffn.shared is not None:
        out.update(ffn_to_hf(ffn.shared.w_in.weight, 2 * ffn.shared.w_out.weight, f"{p}mlp.shared_expert."))
    else:
        out.update(ffn_to_hf(zeros(2, cfg.d_model), zeros(cfg.d_model, 1), f"{p}mlp.shared_expert."))
    for e in range(cfg.moe.n_experts):
        out.update(ffn_to_hf(w[e], ffn.experts.w_out[e], f"{p}mlp.experts.{e}."))
    for proj, heads in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
        out[f"{p}self_attn.{proj}_proj.bias"] = zeros(heads * cfg.head_dim)
    return out


@torch.no_grad()
def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s weights in the names (and layout) of its export architecture."""
    export_architecture(model.config)
    state = model.state_dict()
    if model.config.moe is None:
        out = dense_to_hf(state, model.config.n_layers)
    else:
        out = {hf: t for name, t in state.items() if (hf := non_ffn_to_hf(name)) is not None}
        for i, block in enumerate(model.blocks):
            out.update(_moe_ffn_to_hf(model, i, block.ffn))
    if model.config.tie_embeddings:
        out.pop("lm_head.weight")  # transformers ties it to model.embed_tokens.weight
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}  # clone: no shared storage


def export_hf(model: Transformer, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              special_tokens: dict[str, Any] | None = None) -> Path:
    """Write `model` as a transformers directory (atomically): config.json, model.safetensors and
    the tokenizer files found in `tokenizer_dir`. `special_tokens`: bos/eos/pad token ids."""
    state = hf_state_dict(model)
    config = hf_config(model.config, model.tok_emb.weight.dtype, special_tokens)
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, src in (tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out_dir)


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export a Nexus checkpoint directory with its tokenizer files. Special token ids come from the
    metadata of an imported checkpoint, else from the tokenizer files (e.g. an upcycled MoE)."""
    meta = read_checkpoint_config(checkpoint_dir).get("metadata", {}).get("hf", {})
    special = {k: meta[k] for k in SPECIAL_TOKENS if k in meta} or special_token_ids(checkpoint_dir)
    export_architecture(load_model_config(checkpoint_dir))  # refuse before loading the weights
    model = load_checkpoint(checkpoint_dir)
    return export_hf(model, out_dir, tokenizer_dir=checkpoint_dir, special_tokens=special)


__all__ = ["export_architecture", "export_checkpoint", "export_hf", "hf_config", "hf_state_dict"]
