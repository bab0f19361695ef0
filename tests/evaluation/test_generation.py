"""Decoding with the KV cache gives what decoding without it gives, token for token."""

import pytest
import torch

from nexus.config import tiny
from nexus.evaluation.generation import generate, generate_tokens
from nexus.model.transformer import Transformer
from nexus.upcycling import upcycle

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _large(model: Transformer) -> Transformer:
    """Weights × 10: confident, position-dependent predictions rather than one repeated token."""
    for p in model.parameters():
        p.mul_(10)
    return model


def _model(parallel: bool, moe: bool) -> Transformer:
    torch.manual_seed(0)
    config = tiny(parallel_blocks=parallel, n_kv_heads=2, max_seq_len=16)
    dense = _large(Transformer(config))
    if not moe:
        return dense.eval()
    experts = [_large(Transformer(config).reinit_(torch.Generator().manual_seed(i))) for i in range(3)]
    return upcycle(dense, experts, domain_embeddings=torch.randn(3, 8), top_k=2).eval()


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_output_is_identical_with_and_without_the_cache(parallel, moe):
    """20 new tokens after 8: past the 16-token window, where decoding slides it and reads it again."""
    model = _model(parallel, moe)
    prompt = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 20)
    assert cached.shape == (3, 28) and torch.equal(cached[:, :8], prompt)
    assert torch.equal(cached, generate(model, prompt, 20, use_cache=False))
    assert len(set(cached[:, 8:].flatten().tolist())) > 5  # not one repeated token


def test_sampling_is_the_same_draw_with_and_without_the_cache():
    model = _model(True, True)
    prompt = torch.randint(0, 96, (2, 5))
    runs = [
        generate(model, prompt, 20, temperature=1.0, use_cache=c, generator=torch.Generator().manual_seed(3))
        for c in (True, False)
    ]
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], generate(model, prompt, 20))  # sampled, not greedy


def test_max_context_limits_the_window_read():
    model = _model(False, False)
    seq = torch.randint(0, 96, (1, 12))
    new = torch.stack(list(generate_tokens(model, seq, 6, max_context=4)), dim=1)
    for _ in range(6):  # the reference: every step reads the last 4 tokens
        with torch.no_grad():
            seq = torch.cat([seq, model(seq[:, -4:]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 12:])
    assert list(generate_tokens(model, seq, 0)) == []
