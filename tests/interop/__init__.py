"""Shared builders for the interop tests: tiny real transformers models saved locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

from nexus.interop.hf_format import LLAMA, NEXUS, QWEN2, QWEN2_MOE

VOCAB = 96
# A 2-layer Llama with GQA and a non-default RoPE base, so a mis-mapped head or theta shows up.
LLAMA_KWARGS = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 1000.0,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over `VOCAB` tokens ("w3" … "w95" plus [UNK], <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, norm weights around 1: a mis-mapped tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "norm" in name else 0.0))
    return model


def make_llama(directory: Path, seed: int = 0, **overrides):
    """Save a random tiny `LlamaForCausalLM` (safetensors) and its tokenizer in `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = randomize(LlamaForCausalLM(LlamaConfig(**{**LLAMA_KWARGS, **overrides})), seed=seed).eval()
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


@torch.no_grad()
def perturbed(model, scale: float = 0.1, seed: int = 1):
    """A copy of a Nexus model with every parameter moved by N(0, scale²): a "trained" expert."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def make_family(directory: Path, family: str, seed: int = 0, **overrides):
    """Save a random tiny Llama-architecture sibling (`mistral`, `qwen2`) with the Llama test sizes."""
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    model = randomize(model_cls(config_cls(**{**LLAMA_KWARGS, **overrides})), seed=seed).eval()
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


N_EXPERTS = 3
ROUTER_STD = {"nexus": 0.15, "linear": 0.3}
"""Router weight scales giving clear top-k choices yet unsaturated gates (mean top-1 prob ~0.5-0.75)."""


@torch.no_grad()
def nexus_model(parallel: bool = True, moe: dict | None = None, seed: int = 0, **config) -> torch.nn.Module:
    """A random tiny Nexus model (GQA, RoPE base 1000): dense, or with `moe` (upcycle options: router,
    top_k, shared_expert, normalize_gates) an MoE upcycled from it and 3 perturbed copies, with
    random router weights (and random domain embeddings for the Nexus router)."""
    from nexus.config import tiny
    from nexus.model.transformer import Transformer
    from nexus.upcycling import upcycle

    dense = randomize(
        Transformer(tiny(parallel_blocks=parallel, n_kv_heads=2, rope_theta=1000.0, **config)), seed=seed
    )
    if moe is None:
        return dense.eval()
    router = moe.get("router", "nexus")
    gen = torch.Generator().manual_seed(seed)
    domains = torch.randn(N_EXPERTS, 16, generator=gen) if router == "nexus" else None
    model = upcycle(
        dense,
        [perturbed(dense, seed=seed + i + 1) for i in range(N_EXPERTS)],
        domain_embeddings=domains,
        **moe,
    )
    for name, p in model.named_parameters():
        if ".router." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * ROUTER_STD[router])
    return model.eval()


NEXUS_TOP1 = {"router": "nexus", "top_k": 1}
LINEAR_TOP2 = {"router": "linear", "top_k": 2}
BAM_SHARED_KV_TOP2 = {
    "attention_experts": "shared_kv",
    "attention_routing": "top_k",
    "attention_top_k": 2,
    "attention_shared_expert": True,
}
"""Attention experts (BAM) with every option off its default: the remote code must follow each."""
# name: (parallel blocks, MoE options or None for dense, other config fields, remote_code, architecture)
VARIANTS = {
    "parallel-dense": (True, None, {}, False, NEXUS),
    "parallel-dense-tied-qkv-bias": (True, None, {"tie_embeddings": True, "qkv_bias": True}, False, NEXUS),
    "parallel-nexus-top1": (True, NEXUS_TOP1, {}, False, NEXUS),
    "parallel-nexus-top2-normalized": (
        True,
        {"router": "nexus", "top_k": 2, "normalize_gates": True},
        {},
        False,
        NEXUS,
    ),
    "parallel-nexus-top1-no-shared": (True, {**NEXUS_TOP1, "shared_expert": False}, {}, False, NEXUS),
    "parallel-linear-top2": (True, LINEAR_TOP2, {}, False, NEXUS),
    "parallel-linear-top1-no-shared-tied": (
        True,
        {"router": "linear", "top_k": 1, "shared_expert": False},
        {"tie_embeddings": True},
        False,
        NEXUS,
    ),
    "sequential-dense": (False, None, {}, False, LLAMA),
    "sequential-dense-qkv-bias": (False, None, {"qkv_bias": True}, False, QWEN2),
    "sequential-nexus-top1": (False, NEXUS_TOP1, {}, False, QWEN2_MOE),
    "sequential-nexus-top2-normalized-qkv-bias": (
        False,
        {"router": "nexus", "top_k": 2, "normalize_gates": True},
        {"qkv_bias": True},
        False,
        QWEN2_MOE,
    ),
    "sequential-linear-top2-no-shared-tied": (
        False,
        {**LINEAR_TOP2, "shared_expert": False},
        {"tie_embeddings": True},
        False,
        QWEN2_MOE,
    ),
    "parallel-nexus-bam-full": (True, {**NEXUS_TOP1, "attention_experts": "full"}, {}, False, NEXUS),
    "parallel-linear-top2-bam-shared-kv-top2-shared-qkv-bias": (
        True,
        {**LINEAR_TOP2, **BAM_SHARED_KV_TOP2},
        {"qkv_bias": True},
        False,
        NEXUS,
    ),
    "sequential-nexus-bam-full-shared": (
        False,
        {**NEXUS_TOP1, "attention_experts": "full", "attention_shared_expert": True},
        {},
        False,
        NEXUS,
    ),
    "sequential-dense-remote": (False, None, {}, True, NEXUS),
    "sequential-nexus-top2-remote": (False, {"router": "nexus", "top_k": 2}, {}, True, NEXUS),
}


def variant_model(name: str):
    parallel, moe, config, remote, arch = VARIANTS[name]
    return nexus_model(parallel, moe, **config), remote, arch


def tokens(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |theirs - ours| / max |ours|: the relative error of the logits."""
    return max_diff(ours, theirs) / ours.float().abs().max().item()
