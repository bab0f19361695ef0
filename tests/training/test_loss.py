"""Chunked cross-entropy equals the plain one (forward and gradients), in fp64 and under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from nexus.training.loss import chunked_cross_entropy


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=dtype, generator=g).requires_grad_(True)
    w = torch.randn(50, 16, dtype=dtype, generator=g).requires_grad_(True)
    y = torch.randint(0, 50, (2, 37), generator=g)
    y[0, 3] = y[1, 0] = -100  # ignored targets
    return h, w, y


@pytest.mark.parametrize("chunk", [0, 1, 5, 16, 74, 1000])
def test_chunked_equals_plain_cross_entropy_and_its_gradients(chunk):
    h, w, y = _inputs()
    want = F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten())
    got = chunked_cross_entropy(h, w, y, chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_per_token_reduction():
    h, w, y = _inputs()
    small_y = y[:1, :9]
    small = (
        h[:1, :9, :4].detach().clone().requires_grad_(True),
        w[:7, :4].detach().clone().requires_grad_(True),
    )
    assert torch.autograd.gradcheck(
        lambda a, b: chunked_cross_entropy(a, b, small_y % 7, 4, reduction="sum"), small
    )
    per_token = chunked_cross_entropy(h, w, y, 9, reduction="none")
    assert per_token.shape == y.shape and per_token[0, 3] == 0 and per_token[1, 0] == 0
    want = F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    torch.testing.assert_close(per_token, want)


def test_bf16_autocast_runs_the_gemms_in_bf16_and_keeps_fp32_gradients():
    h64, w64, y = _inputs()
    want = F.cross_entropy((h64 @ w64.t()).flatten(0, 1), y.flatten())
    h, w = h64.detach().float().requires_grad_(True), w64.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, y, 8)
        plain = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    assert got.dtype == torch.float32
    assert abs(got.item() - plain.item()) < 1e-3 and abs(got.item() - want.item()) < 2e-2
    got.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    g_ref = torch.autograd.grad(want, w64)[0]
    assert ((w.grad.double() - g_ref).norm() / g_ref.norm()) < 2e-2
