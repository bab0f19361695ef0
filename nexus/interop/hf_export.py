"""Export a Nexus model as a transformers directory that `AutoModelForCausalLM.from_pretrained` loads,
computing exactly what the Nexus model computes.

Architecture (`export_architecture`): without remote code wherever transformers has the exact
architecture, else the remote-code `NexusForCausalLM` (`nexus/interop/remote/`, `auto_map`):
- dense, sequential blocks -> `LlamaForCausalLM` (`Qwen2ForCausalLM` with q/k/v biases);
- MoE, sequential blocks -> `Qwen2MoeForCausalLM`. Its sparse block (modeling_qwen2_moe.py) is

      y = Σ_{k ∈ TopK(p)} g_k · FFN_ek(x) + sigmoid(w_sᵀ x) · FFN_s(x),
      p = softmax(W_g x) over all experts (fp32), g = top-k of p (renormalised iff norm_topk_prob)

  which is the Nexus layer `y = FFN_s(x) + Σ s_k · FFN_ek(x)` when `W_g = E` (the router matrix;
  for the Nexus router `E = P_r(D)`, evaluated once here), `norm_topk_prob = normalize_gates`,
  `w_s = 0` (so the sigmoid is exactly 0.5) and the shared expert's `down_proj` is doubled (a
  power-of-two scale: `0.5 · (2W) x` rounds exactly like `W x`). Without a shared expert, a
  width-1 all-zero shared expert contributes exactly 0. Qwen2-MoE's q/k/v biases are the model's,
  or zeros; its blocks, RMSNorm, RoPE and GQA attention are Llama's. A Nexus router's projection
  and domain embeddings, which Qwen2-MoE has no place for, go to `nexus_router.safetensors`;
- parallel attention/FFN blocks (the paper's default; no transformers architecture with RMSNorm
  and SwiGLU has them), attention experts (BAM), or `remote_code=True` -> `NexusForCausalLM`,
  which holds the Nexus tensors as they are: the Nexus router ships its projection and the domain
  embeddings, not E (so the export stays extensible and imports back exactly; computing E costs one
  tiny MLP per forward).

Every export records the checkpoint's `ModelConfig`, metadata and file names under `nexus` in
config.json, so `nexus import` restores the checkpoint bit for bit. It also carries the tokenizer
(with a `tokenizer_config.json` when the checkpoint has only `tokenizer.json`), a
`generation_config.json` and a model card: the directory is ready for `push_to_hub` / `upload_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nexus.checkpoint import (
    WEIGHTS,
    load_checkpoint,
    read_checkpoint_config,
    sha256_file,
)
from nexus.config import ModelConfig
from nexus.interop.hf_format import (
    CONFIG_KEYS,
    HF_CONFIG,
    LLAMA,
    NEXUS,
    NEXUS_KEY,
    QWEN2,
    QWEN2_MOE,
    ROUTER_SIDECAR,
    SAFETENSORS,
    SPECIAL_TOKENS,
    atomic_directory,
    block_prefix,
    dense_to_hf,
    ffn_to_hf,
    non_ffn_to_hf,
    read_json,
    remote_name,
    special_token_ids,
    tokenizer_files,
)
from nexus.interop.model_card import model_card
from nexus.interop.remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from nexus.model.moe import MoELayer
from nexus.model.params import parameter_counts
from nexus.model.routers import get_router
from nexus.model.transformer import Transformer

EXPORT_FORMAT, EXPORT_VERSION = "nexus-export", 1
GENERATION_CONFIG, MODEL_CARD, TOKENIZER_CONFIG = (
    "generation_config.json",
    "README.md",
    "tokenizer_config.json",
)


def export_architecture(config: ModelConfig, remote_code: bool = False) -> str:
    """The transformers architecture an export of `config` uses (see the module doc)."""
    if remote_code or config.parallel_blocks or (config.moe is not None and config.moe.has_attention_experts):
        return NEXUS
    if config.is_moe:
        return QWEN2_MOE
    return QWEN2 if config.qkv_bias else LLAMA


def _remote_config(config: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "nexus",
        "parallel_blocks": config.parallel_blocks,
        "qkv_bias": config.qkv_bias,
        "head_dim": config.head_dim,
        "auto_map": {
            "AutoConfig": "configuration_nexus.NexusConfig",
            "AutoModelForCausalLM": "modeling_nexus.NexusForCausalLM",
        },
    }
    if config.moe is not None:
        moe = config.moe
        out.update(
            expert_names=moe.expert_names,
            router=moe.router,
            num_experts_per_tok=moe.top_k,
            shared_expert=moe.shared_expert,
            norm_topk_prob=moe.normalize_gates,
            domain_embed_dim=moe.domain_embed_dim,
            router_hidden_size=moe.router_hidden,
            attention_experts=moe.attention_experts,
            attention_routing=moe.attention_routing,
            attention_top_k=moe.attention_top_k,
            attention_shared_expert=moe.attention_shared_expert,
        )
    return out


def hf_config(
    config: ModelConfig,
    dtype: torch.dtype,
    special_tokens: dict[str, Any] | None = None,
    architecture: str | None = None,
) -> dict[str, Any]:
    """The transformers `config.json` for `config` (Llama / Qwen2 / Qwen2-MoE ones readable by
    transformers 4.x and 5.x)."""
    arch = architecture or export_architecture(config)
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {hf: getattr(config, ours) for ours, hf in CONFIG_KEYS.items()}
    out.update(
        architectures=[arch],
        num_key_value_heads=config.kv_heads,
        hidden_act="silu",
        use_cache=True,
        rope_theta=config.rope_theta,
        dtype=dtype_name,
        torch_dtype=dtype_name,
        **{k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKENS},
    )
    if arch == NEXUS:
        return {**out, **_remote_config(config)}
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}  # 4.x: rope_theta
    if arch == LLAMA:
        return {
            **out,
            "model_type": "llama",
            "head_dim": config.head_dim,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    if arch == QWEN2:
        return {**out, "model_type": "qwen2"}
    moe = config.moe
    out.update(
        model_type="qwen2_moe",
        num_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.normalize_gates,
        moe_intermediate_size=config.ffn_hidden,
        shared_expert_intermediate_size=config.ffn_hidden if moe.shared_expert else 1,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        router_aux_loss_coef=moe.load_balance_coef,
        output_router_logits=False,
    )
    return out


def _moe_ffn_to_hf(model: Transformer, i: int, ffn: MoELayer) -> dict[str, torch.Tensor]:
    """Block i's MoE layer (and zero attention biases if it has none) in Qwen2-MoE names; see the module doc."""
    cfg, p = model.config, block_prefix(i)
    w = ffn.experts.w_in
    zeros = w.new_zeros
    out = {
        f"{p}mlp.gate.weight": ffn.router(model.domain_embeddings).to(w.dtype),  # E: (n, d_model)
        f"{p}mlp.shared_expert_gate.weight": zeros(1, cfg.d_model),
    }  # sigmoid(0) = 0.5 exactly
    if ffn.shared is not None:
        out.update(ffn_to_hf(ffn.shared.w_in.weight, 2 * ffn.shared.w_out.weight, f"{p}mlp.shared_expert."))
    else:
        out.update(ffn_to_hf(zeros(2, cfg.d_model), zeros(cfg.d_model, 1), f"{p}mlp.shared_expert."))
    for e in range(cfg.moe.n_experts):
        out.update(ffn_to_hf(w[e], ffn.experts.w_out[e], f"{p}mlp.experts.{e}."))
    if not cfg.qkv_bias:
        for proj, heads in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
            out[f"{p}self_attn.{proj}_proj.bias"] = zeros(heads * cfg.head_dim)
    return out


def _nexus_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint saves (a tied lm_head is the embedding matrix: not saved)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return state


@torch.no_grad()
def hf_state_dict(model: Transformer, architecture: str | None = None) -> dict[str, torch.Tensor]:
    """`model`'s weights in the names (and layout) of `architecture` (default: `export_architecture`)."""
    arch = architecture or export_architecture(model.config)
    state = _nexus_state(model)
    if arch == NEXUS:
        out = {remote_name(k): v for k, v in state.items()}
    elif model.config.moe is None:
        out = dense_to_hf(state, model.config.n_layers)
    else:
        out = {hf: t for name, t in state.items() if (hf := non_ffn_to_hf(name)) is not None}
        for i, block in enumerate(model.blocks):
            out.update(_moe_ffn_to_hf(model, i, block.ffn))
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}  # clone: no shared storage


def router_sidecar(model: Transformer, architecture: str) -> dict[str, torch.Tensor]:
    """The Nexus-router tensors (Nexus names) that a Qwen2-MoE export keeps beside its weights."""
    moe = model.config.moe
    if architecture != QWEN2_MOE or moe is None or not get_router(moe.router).uses_domain_embeddings:
        return {}
    return {
        k: v.detach().cpu().clone().contiguous()
        for k, v in model.state_dict().items()
        if k == "domain_embeddings" or ".ffn.router.proj." in k
    }


def tokenizer_config(tokenizer_json: Path, max_len: int) -> dict[str, Any] | None:
    """A `tokenizer_config.json` for a bare Nexus `tokenizer.json` (byte-level BPE, EOS and padding
    tokens among its added tokens), with the decoding settings `nexus.data.load_tokenizer` uses;
    None if its special tokens are not Nexus's."""
    from nexus.data.tokenizer import EOS_TOKEN, PAD_TOKEN

    added = {t.get("content") for t in read_json(tokenizer_json).get("added_tokens", [])}
    if EOS_TOKEN not in added:
        return None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        **({"pad_token": PAD_TOKEN} if PAD_TOKEN in added else {}),
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": max_len,
    }


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    special_tokens: dict[str, Any] | None = None,
    remote_code: bool = False,
    metadata: Mapping[str, Any] | None = None,
    results: Sequence[Mapping[str, Any]] = (),
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as a transformers directory (atomically): config.json, model.safetensors, the
    remote code if needed, the tokenizer files found in `tokenizer_dir`, generation_config.json and
    README.md. `special_tokens`: bos/eos/pad token ids (default: from the tokenizer files);
    `metadata`: the checkpoint's; `results`: lm-eval results for the model card."""
    arch = export_architecture(model.config, remote_code)
    state, sidecar = hf_state_dict(model, arch), router_sidecar(model, arch)
    files = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else {}
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        if sidecar:
            save_file(sidecar, str(tmp / ROUTER_SIDECAR), metadata={"format": "pt"})
        if arch == NEXUS:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        if "tokenizer.json" in files and TOKENIZER_CONFIG not in files:
            generated = tokenizer_config(files["tokenizer.json"], model.config.max_seq_len)
            if generated is not None:
                (tmp / TOKENIZER_CONFIG).write_text(json.dumps(generated, indent=2))
        special = special_tokens or special_token_ids(tmp)
        config = hf_config(model.config, model.tok_emb.weight.dtype, special, arch)
        config[NEXUS_KEY] = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "model": model.config.to_dict(),
            "metadata": dict(metadata or {}),
            "files": sorted(files),
        }
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / GENERATION_CONFIG).write_text(
            json.dumps({k: v for k, v in special.items() if k in SPECIAL_TOKENS}, indent=2, sort_keys=True)
        )
        (tmp / MODEL_CARD).write_text(
            model_card(model.config, arch, metadata or {}, parameter_counts(model), results, source)
        )
    return Path(out_dir)


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    remote_code: bool = False,
    results: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Export a Nexus checkpoint directory with its tokenizer files and metadata. Special token ids
    come from the metadata of an imported checkpoint, else from the tokenizer files."""
    info = read_checkpoint_config(checkpoint_dir)
    meta = info.get("metadata", {})
    special = {k: v for k, v in meta.get("hf", {}).items() if k in SPECIAL_TOKENS}
    model = load_checkpoint(checkpoint_dir)
    source = {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "weights SHA-256": info.get("sha256", {}).get(WEIGHTS) or sha256_file(Path(checkpoint_dir) / WEIGHTS),
    }
    return export_hf(
        model,
        out_dir,
        tokenizer_dir=checkpoint_dir,
        special_tokens=special or None,
        remote_code=remote_code,
        metadata=meta,
        results=results,
        source=source,
    )


__all__ = [
    "export_architecture",
    "export_checkpoint",
    "export_hf",
    "hf_config",
    "hf_state_dict",
    "router_sidecar",
    "tokenizer_config",
]
