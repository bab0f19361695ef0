"""Import transformers directories (`config.json` + safetensors) as Nexus checkpoints.

- Dense Llama, Mistral and Qwen2 causal LMs, as seeds or dense experts, with their tokenizer files.
  Each is exactly a Nexus dense model with `parallel_blocks=False`: pre-norm sequential blocks,
  RMSNorm (fp32), rotate-half RoPE, SwiGLU, GQA through `num_key_value_heads`, no biases except
  Qwen2's q/k/v ones (`qkv_bias`), optional tied embeddings. A sliding window (Mistral, Qwen2) that
  is shorter than the context becomes the context (`max_seq_len`): within it, attention is full.
  Anything else (other biases, RoPE scaling, another activation or head size) is refused, naming
  the file and key, rather than imported approximately.
- Any `nexus export` (config.json has a `nexus` entry), whatever its architecture: the checkpoint
  comes back bit for bit (tensors, config, metadata, tokenizer files).
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
from nexus.interop.hf_export import EXPORT_FORMAT, EXPORT_VERSION, hf_state_dict, router_sidecar
from nexus.interop.hf_format import (
    CONFIG_KEYS,
    DENSE_FAMILIES,
    HF_CONFIG,
    NEXUS,
    NEXUS_KEY,
    QWEN2_MOE,
    ROUTER_SIDECAR,
    SPECIAL_TOKENS,
    UnsupportedModelError,
    block_prefix,
    ffn_from_hf,
    hf_to_dense,
    non_ffn_to_hf,
    read_json,
    read_weights,
    remote_name,
    tokenizer_files,
)
from nexus.model.routers import get_router
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
                    f"{source}: {key}.rope_type={kind!r} is not supported (only plain RoPE, 'default')"
                )
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window of a Mistral, or of a Qwen2 with `use_sliding_window` (None: full)."""
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return cfg.get("sliding_window")


def _exported(cfg: dict[str, Any], source: Path) -> dict[str, Any] | None:
    """The `nexus` record of a `nexus export`, checked; None for any other transformers directory."""
    record = cfg.get(NEXUS_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT or "model" not in record:
        raise CheckpointError(f"{source}: '{NEXUS_KEY}' is not a {EXPORT_FORMAT} record")
    if record.get("version", 0) > EXPORT_VERSION:
        raise CheckpointError(
            f"{source}: {EXPORT_FORMAT} version {record['version']} is newer than "
            f"supported ({EXPORT_VERSION})"
        )
    return record


def hf_model_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """The Nexus `ModelConfig` of a transformers directory, refusing anything not exact."""
    source = Path(hf_dir) / HF_CONFIG
    if not Path(hf_dir).is_dir():
        raise CheckpointError(f"{hf_dir}: directory does not exist")
    cfg = read_json(source)
    record = _exported(cfg, source)
    if record is not None:
        try:
            return ModelConfig.from_dict(record["model"], source=f"{source}: {NEXUS_KEY}.model")
        except ConfigError as err:
            raise CheckpointError(str(err)) from err
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type not in DENSE_FAMILIES or (archs and DENSE_FAMILIES[model_type] not in archs):
        raise UnsupportedModelError(
            f"{source}: architectures={archs} (model_type={model_type!r}) is not supported; the dense "
            f"families {sorted(DENSE_FAMILIES.values())} and `nexus export` directories can be imported"
        )
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
            f"hidden_size/num_attention_heads={d_model // n_heads}"
        )
    kv = cfg.get("num_key_value_heads") or n_heads
    fields = {ours: cfg[hf] for ours, hf in CONFIG_KEYS.items() if hf in cfg}
    window = _sliding_window(cfg)
    if window is not None:
        fields["max_seq_len"] = min(fields["max_seq_len"], window)
    try:
        return ModelConfig(
            **fields,
            n_kv_heads=None if kv == n_heads else kv,
            rope_theta=_rope(cfg, source),
            parallel_blocks=False,
            qkv_bias=model_type == "qwen2",
        )
    except (ConfigError, TypeError) as err:
        raise UnsupportedModelError(f"{source}: {err}") from err


def _expected(config: ModelConfig, architecture: str) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """A model of `config` and the tensors (names, shapes) its export as `architecture` holds."""
    model = Transformer(config)
    return model, {**hf_state_dict(model, architecture), **router_sidecar(model, architecture)}


def _from_qwen2_moe(
    hf_state: dict[str, torch.Tensor], model: Transformer, where: Path
) -> dict[str, torch.Tensor]:
    """Inverse of the Qwen2-MoE export (`hf_export._moe_ffn_to_hf`), sidecar tensors included."""
    cfg = model.config
    state = {name: hf_state[hf] for name in model.state_dict() if (hf := non_ffn_to_hf(name)) in hf_state}
    state.update({k: v for k, v in hf_state.items() if k == "domain_embeddings" or ".ffn.router.proj." in k})
    for i in range(cfg.n_layers):
        p, ours = block_prefix(i), f"blocks.{i}.ffn."
        exact_zero = [f"{p}mlp.shared_expert_gate.weight"]
        if cfg.moe.shared_expert:
            w_in, w_out = ffn_from_hf(hf_state, f"{p}mlp.shared_expert.")
            state[ours + "shared.w_in.weight"], state[ours + "shared.w_out.weight"] = w_in, w_out / 2
        else:
            exact_zero += [f"{p}mlp.shared_expert.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        if not cfg.qkv_bias:
            exact_zero += [f"{p}self_attn.{proj}_proj.bias" for proj in "qkv"]
        nonzero = [k for k in exact_zero if hf_state[k].any()]
        if nonzero:
            raise CheckpointError(f"{where}: {nonzero[0]} must be all zeros in an export of this Nexus model")
        experts = [ffn_from_hf(hf_state, f"{p}mlp.experts.{e}.") for e in range(cfg.moe.n_experts)]
        state[ours + "experts.w_in"] = torch.stack([w for w, _ in experts])
        state[ours + "experts.w_out"] = torch.stack([w for _, w in experts])
        if "weight" in get_router(cfg.moe.router).expert_rows:  # a linear router: E is its own matrix
            state[ours + "router.weight"] = hf_state[f"{p}mlp.gate.weight"]
    return state


def _check_router_matrix(model: Transformer, hf_state: dict[str, torch.Tensor], where: Path) -> None:
    """A Qwen2-MoE export of a Nexus router holds E = P_r(D): refuse one whose E was changed since."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            stored = hf_state[f"{block_prefix(i)}mlp.gate.weight"].float()
            computed = block.ffn.router(model.domain_embeddings).float()
            if not torch.allclose(stored, computed, rtol=1e-4, atol=1e-6):
                raise CheckpointError(
                    f"{where}: {block_prefix(i)}mlp.gate.weight differs from the router that {ROUTER_SIDECAR} "
                    "describes (E = P_r(D)); the export was changed after `nexus export`"
                )


@torch.no_grad()
def load_hf_model(hf_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """Load a transformers directory (a dense family, or any `nexus export`) into a `Transformer`
    (safetensors only, no pickle). `dtype` defaults to the stored dtype of the embedding matrix."""
    hf_dir = Path(hf_dir)
    config = hf_model_config(hf_dir)
    cfg = read_json(hf_dir / HF_CONFIG)
    exported = NEXUS_KEY in cfg
    architecture = (cfg.get("architectures") or [""])[0] if exported else None
    hf_state = {k: v for k, v in read_weights(hf_dir).items() if not k.endswith(_IGNORED_TENSORS)}
    sidecar = architecture == QWEN2_MOE and get_router(config.moe.router).uses_domain_embeddings
    if sidecar:
        hf_state.update(read_weights(hf_dir, ROUTER_SIDECAR))
    model, expected = _expected(config, architecture or DENSE_FAMILIES[cfg["model_type"]])
    optional = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: the embedding matrix
    check_state_shapes(hf_state, expected, f"{hf_dir}: weights do not match {HF_CONFIG}", optional)
    names = list(model.state_dict())
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
        names.remove("lm_head.weight")
    if architecture == NEXUS:
        state = {name: hf_state[remote_name(name)] for name in names}
    elif architecture == QWEN2_MOE:
        state = _from_qwen2_moe(hf_state, model, hf_dir)
    else:
        state = hf_to_dense(hf_state, names, config.n_layers)
    dtype = dtype or hf_state["model.embed_tokens.weight"].dtype
    model.to(dtype).load_state_dict(state, strict=not config.tie_embeddings)
    if sidecar:
        _check_router_matrix(model, hf_state, hf_dir)
    return model.eval()


def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    like: str | os.PathLike | None = None,
) -> Path:
    """Import a transformers directory as a Nexus checkpoint (atomic), tokenizer files included.

    A `nexus export` comes back as the checkpoint it was exported from: its metadata and the files it
    had. With `like` (a seed checkpoint or HF directory), first check that the model shares its
    architecture and tokenizer (`check_same_family`) and write nothing if not."""
    hf_dir = Path(hf_dir)
    if like is not None:
        check_same_family(like, hf_dir)
    model = load_hf_model(hf_dir, dtype)
    cfg = read_json(hf_dir / HF_CONFIG)
    files = tokenizer_files(hf_dir)
    if NEXUS_KEY in cfg:
        record = cfg[NEXUS_KEY]
        meta = record.get("metadata", {})
        files = {name: path for name, path in files.items() if name in record.get("files", [])}
    else:
        meta = {
            "hf": {
                "source": str(hf_dir.resolve()),
                "architecture": DENSE_FAMILIES[cfg["model_type"]],
                **{k: cfg[k] for k in SPECIAL_TOKENS if cfg.get(k) is not None},
            }
        }
    return save_checkpoint(model, out_dir, metadata=meta, extra_files=files)


def model_config_of(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a Nexus checkpoint or of an importable transformers directory."""
    if read_json(Path(directory) / CONFIG).get("format") == FORMAT:
        read_checkpoint_config(directory)
        return load_model_config(directory)
    return hf_model_config(directory)


def check_same_family(reference: str | os.PathLike, other: str | os.PathLike) -> None:
    """Raise `IncompatibleModelsError` unless `other` has `reference`'s dense architecture and the
    byte-identical tokenizer files (same names, same SHA-256). Either may be a Nexus checkpoint or
    an importable transformers directory: experts must share the seed's architecture and tokenizer."""
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
            f"{other} does not share the tokenizer of {reference}: " + ", ".join(problems)
        )


__all__ = ["check_same_family", "hf_model_config", "import_hf", "load_hf_model", "model_config_of"]
