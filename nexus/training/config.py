"""Typed training configuration shared by every stage (seed, experts, MoE, extension finetune)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nexus.errors import ConfigError

RUNTIME_ONLY = (
    "progress_bar",
    "num_workers",
    "log_every_n_steps",
    "checkpoint_every_n_steps",
    "loss_chunk_tokens",
    "activation_checkpointing",
)
IDENTITY_IF_SET = {"grad_accum_steps": 1, "save_dtype": "float32"}
"""Fields added later: part of a stage's identity only when not at their default, so the stages
trained before they existed keep their fingerprints."""
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp")
SAVE_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Optimiser, schedule and Trainer settings of one training stage (paper §4.1: AdamW, peak LR
    1e-3, linear warmup over 10 % of the steps, cosine decay)."""

    max_steps: int = 1000
    batch_size: int = 8
    """Sequences per optimizer step and device (the global batch is batch_size × devices)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step: each holds batch_size / grad_accum_steps sequences, so
    accumulation changes the memory a step needs, not the batch it trains on."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The cosine decays from `lr` to `min_lr_ratio · lr`."""
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold; 0 disables clipping."""
    precision: str = "auto"
    """Lightning precision; "auto" means "bf16-mixed" on a bf16-capable GPU, "32-true" otherwise."""
    compile: bool = False
    """`torch.compile` the model (in place, so state-dict keys do not change)."""
    val_every_n_steps: int = 100
    limit_val_batches: int = 8
    """Validation batches per domain."""
    seed: int = 0
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    """Parameter groups this stage trains (nexus.training.freeze): `all`, or e.g. `[router, expert:code]`."""
    accelerator: str = "auto"
    devices: int | str = "auto"
    """Devices (processes) of this stage: a number, or "auto" = 1 (never "all GPUs": the pipeline
    places stages on GPUs, see docs/flows.md). More than one runs the stage as its own processes
    (`nexus.training.launch`)."""
    strategy: str = "auto"
    """"auto" (one device), "ddp" or "fsdp" (FSDP2: parameters, gradients and optimizer state
    sharded over the devices; the final checkpoint is the full model)."""
    loss_chunk_tokens: int = 0
    """Cross-entropy `loss_chunk_tokens` tokens at a time (`nexus.training.loss`), never holding the
    (tokens, vocab) logits; 0: the whole micro-batch at once."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward instead of keeping its activations."""
    save_dtype: str = "float32"
    """dtype of the final checkpoint's weights ("bfloat16" halves it; training keeps fp32 weights)."""
    num_workers: int = 0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    """Lightning checkpoint (for resume) cadence; a hard kill loses at most this many steps."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.trainable = list(self.trainable)
        from nexus.training.freeze import check_trainable

        check_trainable(self.trainable)
        for key in (
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "val_every_n_steps",
            "limit_val_batches",
            "log_every_n_steps",
            "checkpoint_every_n_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"train.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise ConfigError("train.grad_clip, weight_decay and num_workers must be >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision {self.precision!r} is not one of {PRECISIONS}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.devices != "auto" and (not isinstance(self.devices, int) or self.devices < 1):
            raise ConfigError(f"train.devices must be a number >= 1 or 'auto', got {self.devices!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"train.save_dtype {self.save_dtype!r} is not one of {SAVE_DTYPES}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")

    @property
    def num_devices(self) -> int:
        return 1 if self.devices == "auto" else int(self.devices)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_frac * self.max_steps)

    def resolved_precision(self) -> str:
        """The concrete Lightning precision string for this machine."""
        if self.precision != "auto":
            return self.precision
        import torch  # here, not at import: composing a config must not import torch

        on_gpu = self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that change the trained model (a resumed run may change the others)."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in RUNTIME_ONLY and not (k in IDENTITY_IF_SET and v == IDENTITY_IF_SET[k])
        }
