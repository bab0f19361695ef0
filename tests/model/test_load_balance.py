"""The Switch load-balancing loss `n · Σ_i f_i · P_i` term by term: `f_i` is the share of routing
*assignments* (top-k aware) sent to expert i and carries no gradient, `P_i` is expert i's mean router
probability and carries all of it; the MoE layer reports the loss of the assignments it made."""

import pytest
import torch

from nexus.config import MoEConfig
from nexus.model.moe import MoELayer, load_balance_loss


def reference(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """`n · Σ_i f_i · P_i`, one assignment at a time: f_i = assignments to i / all assignments (k per
    token), counted in Python so it cannot carry a gradient; P_i = mean over tokens of probs[:, i]."""
    n = probs.shape[1]
    chosen = expert_index.flatten().tolist()
    f = [chosen.count(i) / len(chosen) for i in range(n)]
    return n * sum(f[i] * probs[:, i].mean() for i in range(n))


def _probs(tokens: int, n: int) -> torch.Tensor:
    return torch.randn(tokens, n, dtype=torch.float64).softmax(-1).requires_grad_(True)


def test_token_fraction_counts_every_top_k_assignment():
    """Top-2 over 4 tokens: expert 0 is chosen by every token, 1 by two, 2 and 3 by one each, so
    f = (4, 2, 1, 1) / 8, not a share of tokens and not of the first choice only."""
    probs = _probs(4, 4)
    index = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    f = torch.tensor([4, 2, 1, 1], dtype=torch.float64) / 8
    want = 4 * (f * probs.detach().mean(0)).sum()
    torch.testing.assert_close(load_balance_loss(probs, index).detach(), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(load_balance_loss(probs, index), reference(probs, index), rtol=1e-12, atol=0)
    # the same assignments, listed in another order, are the same loss
    torch.testing.assert_close(load_balance_loss(probs, index.flip(1)), load_balance_loss(probs, index))


def test_gradient_flows_through_the_mean_probability_only():
    """d loss / d probs[t, i] = n · f_i / tokens for every token t: `f` is a constant (counts), `P` the
    only differentiable factor."""
    tokens, n = 6, 3
    probs = _probs(tokens, n)
    index = torch.tensor([[0], [0], [0], [1], [1], [2]])
    (grad,) = torch.autograd.grad(load_balance_loss(probs, index), probs)
    f = torch.tensor([3, 2, 1], dtype=torch.float64) / 6
    torch.testing.assert_close(grad, (n * f / tokens).expand(tokens, n), rtol=1e-12, atol=0)


def test_global_counts_replace_the_local_ones():
    """Data-parallel training passes the counts summed over ranks: `f` then comes from them, `P` still
    from this rank's tokens."""
    probs = _probs(4, 2)
    index = torch.tensor([[0], [0], [0], [1]])
    counts = torch.tensor([1, 3])
    want = 2 * (torch.tensor([0.25, 0.75], dtype=torch.float64) * probs.detach().mean(0)).sum()
    torch.testing.assert_close(load_balance_loss(probs, index, counts).detach(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_the_layer_reports_the_loss_of_the_assignments_it_made(top_k):
    cfg = MoEConfig(expert_names=["a", "b", "c", "d"], router="linear", top_k=top_k, load_balance_coef=0.3)
    layer = MoELayer(16, 24, cfg).double()
    x = torch.randn(50, 16, dtype=torch.float64)
    _, info = layer(x)
    assert info.expert_index.shape == (50, top_k)
    want = reference(info.probs, info.expert_index)
    torch.testing.assert_close(info.load_balance_loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.aux_loss, 0.3 * want, rtol=1e-12, atol=0)
    # its gradient reaches the router through P (the expert choice itself is not differentiable)
    got = torch.autograd.grad(info.load_balance_loss, layer.router.weight, retain_graph=True)[0]
    expected = torch.autograd.grad(want, layer.router.weight)[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
