"""Import a Llama-architecture causal LM saved by transformers (`config.json` + safetensors) as a
Nexus dense model: a seed or a dense expert, with its tokenizer files.

Llama is exactly a Nexus dense model with `parallel_blocks=False`: pre-norm sequential blocks,
RMSNorm (fp32), rotate-half RoPE, SwiGLU, GQA through `num_key_value_heads`, no biases, optional
tied embeddings. Anything else (biases, RoPE scaling, another activation or head size) is refused,
naming the file and key, rather than imported approximately.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nexus.checkpoint import (
    CONFIG,
    FORMAT,
    check_state_shapes,
    load_model_config,
    read_checkpoint_config,
    save_checkpoint,
    sha256_file,
)
from nexus.config import ModelConfig
from nexus.errors import CheckpointError, ConfigError, IncompatibleModelsError
from nexus.interop.hf_format import (
    CONFIG_KEYS,
    HF_CONFIG,
    LLAMA,
    SPECIAL_TOKENS,
    UnsupportedModelError,
    dense_to_hf,
    hf_to_dense,
    read_json,
    read_weights,
    tokenizer_files,
)
from nexus.model.transformer import Transformer
from nexus.upcycling import check_configs_compatible

_IGNORED_TENSORS = ".rotary_emb.inv_freq"  # a buffer some older transformers versions saved


def _rope(cfg: dict[str, Any], source: Path) -> float:
    """`rope_theta` of plain RoPE, from `rope_parameters` (transformers 5) or the top level (4.x)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if params:
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default":
                raise UnsupportedModelError(
                    f"{source}: {key}.rope_type={kind!r} is not supported (only plain RoPE, 'default')")
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_model_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """The Nexus `ModelConfig` of a transformers Llama directory, refusing anything not exact."""
    source = Path(hf_dir) / HF_CONFIG
    if not Path(hf_dir).is_dir():
        raise CheckpointError(f"{hf_dir}: directory does not exist")
    cfg = read_json(source)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and LLAMA not in archs):
        raise UnsupportedModelError(
            f"{source}: architectures={archs} (model_type={cfg.get('model_type')!r}) is not supported; "
            f"only {LLAMA} (model_type 'llama') can be imported")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise UnsupportedModelError(f"{source}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    optional = ("tie_word_embeddings", "initializer_range")
    missing = [k for k in CONFIG_KEYS.values() if k not in cfg and k not in optional]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}")
    n_heads, d_model = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("head_dim") not in (None, d_model // n_heads):
        raise UnsupportedModelError(
            f"{source}: head_dim={cfg['head_dim']} differs from "
            f"hidden_size/num_attention_heads={d_model // n_heads}")
    kv = cfg.get("num_key_value_heads") or n_heads
    fields = {ours: cfg[hf] for ours, hf in CONFIG_KEYS.items() if hf in cfg}
    try:
        return ModelConfig(**fields, n_kv_heads=None if kv == n_heads else kv, rope_theta=_rope(cfg, source),
                           parallel_blocks=False)
    except (ConfigError, TypeError) as err:
        raise UnsupportedModelError(f"{source}: {err}") from err


@torch.no_grad()
def load_hf_model(hf_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """Load a transformers Llama directory into a dense `Transformer` (safetensors only, no pickle).

    `dtype` defaults to the stored dtype of the embedding matrix."""
    hf_dir = Path(hf_dir)
    config = hf_model_config(hf_dir)
    hf_state = {k: v for k, v in read_weights(hf_dir).items() if not k.endswith(_IGNORED_TENSORS)}
    model = Transformer(config)
    names = list(model.state_dict())
    expected = dense_to_hf(model.state_dict(), config.n_layers)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: the embedding matrix
    check_state_shapes(hf_state, expected, f"{hf_dir}: weights do not match {HF_CONFIG}", optional)
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
        names.remove("lm_head.weight")
    dtype = dtype or hf_state["model.embed_tokens.weight"].dtype
    state = hf_to_dense(hf_state, names, config.n_layers)
    model.to(dtype).load_state_dict(state, strict=not config.tie_embeddings)
    return model.eval()


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
              like: str | os.PathLike | None = None) -> Path:
    """Import a transformers Llama directory as a Nexus checkpoint (atomic), tokenizer files included.

    With `like` (a seed checkpoint or HF directory), first check that the model shares its
    architecture and tokenizer (`check_same_family`) and write nothing if not."""
    hf_dir = Path(hf_dir)
    if like is not None:
        check_same_family(like, hf_dir)
    model = load_hf_model(hf_dir, dtype)
    cfg = read_json(hf_dir / HF_CONFIG)
    meta = {"hf": {"source": str(hf_dir.resolve()), "architecture": LLAMA,
                   **{k: cfg[k] for k in SPECIAL_TOKENS if cfg.get(k) is not None}}}
    return save_checkpoint(model, out_dir, metadata=meta, extra_files=tokenizer_files(hf_dir))


def model_config_of(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a Nexus checkpoint or of a transformers Llama directory."""
    if read_json(Path(directory) / CONFIG).get("format") == FORMAT:
        read_checkpoint_config(directory)
        return load_model_config(directory)
    return hf_model_config(directory)


def check_same_family(reference: str | os.PathLike, other: str | os.PathLike) -> None:
    """Raise `IncompatibleModelsError` unless `other` has `reference`'s dense architecture and the
    byte-identical tokenizer files (same names, same SHA-256). Either may be a Nexus checkpoint or
    a transformers Llama directory: experts must share the seed's architecture and tokenizer."""
    ref_cfg, other_cfg = model_config_of(reference), model_config_of(other)
    check_configs_compatible(ref_cfg, [other_cfg], [str(other)])
    ref_tok, other_tok = tokenizer_files(reference), tokenizer_files(other)
    problems = []
    for name in sorted(set(ref_tok) | set(other_tok)):
        if name not in other_tok or name not in ref_tok:
            problems.append(f"{name} missing in {other if name not in other_tok else reference}")
        elif sha256_file(ref_tok[name]) != sha256_file(other_tok[name]):
            problems.append(f"{name} differs")
    if problems:
        raise IncompatibleModelsError(
            f"{other} does not share the tokenizer of {reference}: " + ", ".join(problems))


__all__ = ["check_same_family", "hf_model_config", "import_hf", "load_hf_model", "model_config_of"]
