import pytest

from nexus.errors import ConfigError
from nexus.training.config import RUNTIME_ONLY, TrainConfig


def test_defaults_follow_the_paper():
    cfg = TrainConfig(max_steps=200)
    assert cfg.lr == 1e-3 and cfg.warmup_frac == 0.1 and cfg.warmup_steps == 20


def test_auto_precision_is_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert TrainConfig().resolved_precision() == "32-true"
    assert TrainConfig(precision="bf16-mixed").resolved_precision() == "bf16-mixed"


def test_auto_precision_is_bf16_on_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    assert TrainConfig().resolved_precision() == "bf16-mixed"
    assert TrainConfig(accelerator="cpu").resolved_precision() == "32-true"


@pytest.mark.parametrize(
    "bad",
    [
        {"max_steps": 0},
        {"lr": 0.0},
        {"warmup_frac": 1.0},
        {"grad_clip": -1.0},
        {"precision": "fp8"},
        {"min_lr_ratio": 2.0},
        {"batch_size": 0},
    ],
)
def test_invalid_values_raise(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_identity_ignores_runtime_only_fields():
    a, b = TrainConfig(progress_bar=True, num_workers=0), TrainConfig(progress_bar=False, num_workers=2)
    assert a.identity() == b.identity() and not set(RUNTIME_ONLY) & set(a.identity())
    assert TrainConfig(lr=2e-3).identity() != a.identity()
