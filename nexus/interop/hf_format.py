"""The Hugging Face format, in one place, for both directions of interop.

- `BLOCK_NAMES` / `GLOBAL_NAMES`: the one weight-name table (Nexus name -> HF name). Llama, Mistral,
  Qwen2, Qwen2-MoE and the remote-code `NexusForCausalLM` name every non-FFN tensor identically, so
  the table serves import and every export.
- `ffn_to_hf` / `ffn_from_hf`: a SwiGLU FFN, whose `w_in` fuses `[gate; up]` rows, as HF's separate
  `gate_proj`, `up_proj`, `down_proj` (dense MLP, shared expert and each routed expert alike).
- `REMOTE_FFN_NAMES`, `REMOTE_ATTENTION_NAMES` / `remote_name`: `NexusForCausalLM` keeps the Nexus
  tensors as they are (fused `gate_up_proj`, stacked FFN and attention experts), so its names are a
  bijection with the Nexus state dict.
- Safetensors-only weight reading (single file or sharded index; never a pickle), tokenizer files,
  and `atomic_directory` for all-or-nothing writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nexus.checkpoint import read_json
from nexus.errors import CheckpointError, NexusError
from nexus.io import atomic_directory  # noqa: F401  (re-exported for hf_export)

LLAMA = "LlamaForCausalLM"
MISTRAL = "MistralForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
NEXUS = "NexusForCausalLM"
"""The remote-code architecture (`nexus/interop/remote/`), loaded with `trust_remote_code=True`."""
DENSE_FAMILIES = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2}
"""transformers `model_type` -> architecture of the dense models that import as seeds or experts."""
HF_CONFIG = "config.json"
NEXUS_KEY = "nexus"
"""The key of an export's config.json that records the Nexus checkpoint it came from (model config,
metadata, file names), so that importing it back restores the checkpoint exactly."""
ROUTER_SIDECAR = "nexus_router.safetensors"
"""Nexus-router tensors a Qwen2-MoE export cannot hold (projections P_r, domain embeddings D)."""
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Files that define a tokenizer in a transformers directory; copied on import and export."""
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Nexus state-dict name -> HF name. Inside block i (`blocks.{i}.` <-> `model.layers.{i}.`):
BLOCK_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Inside block i, the FFN of `NexusForCausalLM`: the Nexus tensors under transformers-style names.
REMOTE_FFN_NAMES: dict[str, str] = {
    "ffn.w_in.weight": "mlp.gate_up_proj.weight",
    "ffn.w_out.weight": "mlp.down_proj.weight",
    "ffn.shared.w_in.weight": "mlp.shared_expert.gate_up_proj.weight",
    "ffn.shared.w_out.weight": "mlp.shared_expert.down_proj.weight",
    "ffn.experts.w_in": "mlp.experts.gate_up_proj",
    "ffn.experts.w_out": "mlp.experts.down_proj",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.proj.w_in.weight": "mlp.router.gate_up_proj.weight",
    "ffn.router.proj.w_out.weight": "mlp.router.down_proj.weight",
}
# Inside block i, the attention experts (BAM) of `NexusForCausalLM`, stacked as in Nexus; a `shared_kv`
# model's one key/value projection keeps the dense names (BLOCK_NAMES).
REMOTE_ATTENTION_NAMES: dict[str, str] = {
    **{f"attn.experts.w{p}": f"self_attn.experts.{p}_proj" for p in "qkvo"},
    **{f"attn.experts.b{p}": f"self_attn.experts.{p}_bias" for p in "qkv"},
    **{f"attn.shared.w{p}.weight": f"self_attn.shared_expert.{p}_proj.weight" for p in "qkvo"},
    **{f"attn.shared.w{p}.bias": f"self_attn.shared_expert.{p}_proj.bias" for p in "qkv"},
    "attn.router.weight": "self_attn.gate.weight",
    "attn.router.proj.w_in.weight": "self_attn.router.gate_up_proj.weight",
    "attn.router.proj.w_out.weight": "self_attn.router.down_proj.weight",
}
REMOTE_DOMAIN_EMBEDDINGS = "model.domain_embeddings"
GLOBAL_NAMES: dict[str, str] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# ModelConfig field -> HF config key, shared by LlamaConfig and Qwen2MoeConfig.
CONFIG_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "ffn_hidden": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


class UnsupportedModelError(NexusError):
    """A model or configuration that has no exact counterpart on the other side of interop."""


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


def non_ffn_to_hf(name: str) -> str | None:
    """The HF name of a non-FFN Nexus tensor (None for FFN tensors and buffers)."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in BLOCK_NAMES:
        return block_prefix(int(parts[1])) + BLOCK_NAMES[parts[2]]
    return None


def remote_name(name: str) -> str:
    """The `NexusForCausalLM` name of a Nexus state-dict tensor (a bijection)."""
    if name == "domain_embeddings":
        return REMOTE_DOMAIN_EMBEDDINGS
    if (hf := non_ffn_to_hf(name)) is not None:
        return hf
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in REMOTE_FFN_NAMES:
        return block_prefix(int(parts[1])) + REMOTE_FFN_NAMES[parts[2]]
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in REMOTE_ATTENTION_NAMES:
        return block_prefix(int(parts[1])) + REMOTE_ATTENTION_NAMES[parts[2]]
    raise KeyError(f"no NexusForCausalLM name for tensor {name!r}")


def ffn_to_hf(w_in: torch.Tensor, w_out: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """`FFN(x) = W_out · SwiGLU(W_in · x)`, `W_in = [gate; up]` -> HF `{prefix}{gate,up,down}_proj.weight`."""
    gate, up = w_in.chunk(2, dim=0)
    return {
        f"{prefix}gate_proj.weight": gate,
        f"{prefix}up_proj.weight": up,
        f"{prefix}down_proj.weight": w_out,
    }


def ffn_from_hf(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `ffn_to_hf`: (w_in, w_out) from HF `{prefix}{gate,up,down}_proj.weight`."""
    w_in = torch.cat([state[f"{prefix}gate_proj.weight"], state[f"{prefix}up_proj.weight"]], dim=0)
    return w_in, state[f"{prefix}down_proj.weight"]


def dense_to_hf(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """A dense Nexus state dict in Llama names (the one mapping import checks against)."""
    out = {hf: state[name] for name in state if (hf := non_ffn_to_hf(name)) is not None}
    for i in range(n_layers):
        p = f"blocks.{i}.ffn."
        out.update(ffn_to_hf(state[p + "w_in.weight"], state[p + "w_out.weight"], block_prefix(i) + "mlp."))
    return out


def hf_to_dense(
    hf_state: dict[str, torch.Tensor], names: list[str], n_layers: int
) -> dict[str, torch.Tensor]:
    """Inverse of `dense_to_hf` for the Nexus tensor `names` (non-persistent buffers excluded)."""
    out = {name: hf_state[hf] for name in names if (hf := non_ffn_to_hf(name)) is not None}
    for i in range(n_layers):
        w_in, w_out = ffn_from_hf(hf_state, block_prefix(i) + "mlp.")
        out[f"blocks.{i}.ffn.w_in.weight"], out[f"blocks.{i}.ffn.w_out.weight"] = w_in, w_out
    return out


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors file(s) of a transformers directory; refuses pickle-only directories."""
    if (hf_dir / SAFETENSORS).is_file():
        return [hf_dir / SAFETENSORS]
    if (hf_dir / SAFETENSORS_INDEX).is_file():
        index = read_json(hf_dir / SAFETENSORS_INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise CheckpointError(f"{hf_dir / SAFETENSORS_INDEX}: empty or missing 'weight_map'")
        missing = [s for s in shards if not (hf_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{hf_dir / SAFETENSORS_INDEX}: shard(s) {missing} not found")
        return [hf_dir / s for s in shards]
    pickles = [name for name in PICKLE_WEIGHTS if (hf_dir / name).is_file()]
    if pickles:
        raise CheckpointError(
            f"{hf_dir}: only {pickles[0]} (pickle) weights found; Nexus never unpickles. Convert them "
            f"to safetensors first (e.g. `model.save_pretrained(dir, safe_serialization=True)`)."
        )
    raise CheckpointError(f"{hf_dir}: no {SAFETENSORS} or {SAFETENSORS_INDEX} found")


def read_weights(hf_dir: Path, file_name: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory (or of its safetensors file `file_name`), read with
    safetensors (no pickle)."""
    if file_name is not None and not (hf_dir / file_name).is_file():
        raise CheckpointError(f"{hf_dir}: {file_name} not found")
    state: dict[str, torch.Tensor] = {}
    for path in [hf_dir / file_name] if file_name else weight_files(hf_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                state.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({err})") from err
    return state


def tokenizer_files(directory: str | os.PathLike) -> dict[str, Path]:
    """{file name: path} of the tokenizer files present in `directory` (HF or Nexus checkpoint)."""
    directory = Path(directory)
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def special_token_ids(directory: str | os.PathLike) -> dict[str, int]:
    """bos/eos/pad token ids named by `tokenizer_config.json` and numbered by `tokenizer.json`
    ({} when either file is absent): the fallback when a checkpoint's metadata does not carry them."""
    directory = Path(directory)
    if not ((directory / "tokenizer_config.json").is_file() and (directory / "tokenizer.json").is_file()):
        return {}
    config, tok = read_json(directory / "tokenizer_config.json"), read_json(directory / "tokenizer.json")
    vocab = (tok.get("model") or {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    out = {}
    for key in SPECIAL_TOKENS:
        token = config.get(key.removesuffix("_id"))
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            out[key] = ids[token]
    return out
