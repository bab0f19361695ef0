import itertools

import pytest
import torch

from nexus.training.schedule import warmup_cosine, warmup_cosine_scheduler


def test_warmup_is_linear_then_cosine_to_min_ratio():
    lrs = [warmup_cosine(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10, 0.1) == pytest.approx(0.1)  # clamped past the end


def test_no_warmup_starts_at_peak():
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


def test_scheduler_drives_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = warmup_cosine_scheduler(opt, total_steps=20, warmup_steps=4, min_ratio=0.0)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2.5e-4) and seen[3] == pytest.approx(1e-3) and seen[-1] < 1e-5
    assert all(isinstance(v, (int, float, list, type(None), bool)) for v in sched.state_dict().values())
