"""Shared builders for the interop tests: tiny real transformers models saved locally (no hub)."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
# A 2-layer Llama with GQA and a non-default RoPE base, so a mis-mapped head or theta shows up.
LLAMA_KWARGS = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                    "rope_theta": 1000.0, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}


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


def tokens(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
