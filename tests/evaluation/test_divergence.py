"""Divergent-token metrics: a model never diverges from itself, nor from itself with its Nexus routers
precomputed; a different model diverges at a finite position, and the counts follow the definition."""

import copy

import numpy as np
import pytest
import torch

from nexus.config import tiny
from nexus.evaluation.divergence import Divergence, divergence, divergence_by_domain, held_out_prompts
from nexus.evaluation.generation import generate
from nexus.model.transformer import Transformer
from nexus.upcycling import extend, upcycle

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _moe() -> Transformer:
    torch.manual_seed(0)
    config = tiny(max_seq_len=32)
    seed = Transformer(config)
    experts = [Transformer(config).reinit_(torch.Generator().manual_seed(i)) for i in range(3)]
    for model in (seed, *experts):
        for p in model.parameters():
            p.mul_(10)  # confident, varied predictions rather than one repeated token
    return upcycle(seed, experts, domain_embeddings=torch.randn(3, 8)).eval()


PROMPTS = torch.randint(0, 96, (6, 8), generator=torch.Generator().manual_seed(1))


def test_a_model_never_diverges_from_itself_nor_from_its_precomputed_router():
    moe = _moe()
    same = divergence(moe, moe, PROMPTS, 16)
    assert same.first == [None] * 6 and same.share == 0.0 and same.never == 1.0
    assert same.mean_first == 16.0 and same.median_first == 16.0  # censored at the continuation length
    frozen = copy.deepcopy(moe)
    frozen.precompute_routers()
    assert divergence(moe, frozen, PROMPTS, 16).first == [None] * 6


def test_another_model_diverges_at_a_finite_position_matching_teacher_forced_argmax():
    moe = _moe()
    other = extend(
        moe,
        Transformer(moe.config.dense()).reinit_(torch.Generator().manual_seed(9)),
        domain_embedding=torch.randn(8),
        lam=0.5,
    ).eval()
    got = divergence(moe, other, PROMPTS, 16, batch_size=4)
    assert got.share > 0 and got.never < 1 and 0 <= got.mean_first < 16
    assert all(f is None or 0 <= f < 16 for f in got.first)
    seq = generate(moe, PROMPTS, 16)  # the definition, spelled out
    with torch.no_grad():
        pred = other(seq[:, :-1]).logits[:, 7:].argmax(-1)
    differs = pred != seq[:, 8:]
    assert got.share == pytest.approx(differs.float().mean().item())
    assert got.first == [int(r.nonzero()[0]) if r.any() else None for r in differs]
    assert Divergence.from_dict(got.to_dict()) == got
    by_domain = divergence_by_domain(moe, other, {"a": PROMPTS[:3], "b": PROMPTS[3:]}, 16)
    assert by_domain["a"].first + by_domain["b"].first == got.first


def test_prompts_are_evenly_spaced_windows_and_too_long_continuations_fail():
    tokens = np.arange(100)
    prompts = held_out_prompts(tokens, 4, 10)
    assert prompts.shape == (4, 10) and prompts[0, 0] == 0 and prompts[-1, -1] == 99
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        divergence(_moe(), _moe(), PROMPTS, 30)
