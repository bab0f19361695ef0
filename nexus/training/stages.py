"""Stage functions the flows call: one Lightning code path for every training stage.

- `train_dense`: seed pretraining (from `model_config`) or an expert branch (from the seed checkpoint);
- `train_moe`: MoE training after upcycling, or the finetune after extension.

An output directory holds
  model/            the final model, a `nexus.checkpoint` safetensors checkpoint (its metadata: the
                    stage fingerprint, step and metrics)
  lightning/        Lightning checkpoints for resume (`last.ckpt`)
  stage.json        the stage fingerprint (config + data + input checkpoint)
Rerunning with the same arguments returns the finished model at once, or resumes from
`lightning/last.ckpt` (loaded with `weights_only=True`, no arbitrary unpickling). Different
arguments in a used directory raise `ConfigError` instead of silently mixing two runs.

Several devices (`devices > 1`) need one process per device: run the stage through
`nexus.training.launch` (torchrun), never by re-executing the calling program. Under FSDP the final
checkpoint is the full model gathered to rank 0; `lightning/` (the resume checkpoint) is deleted
only after the final checkpoint has been written and loads back.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from nexus.checkpoint import WEIGHTS, load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.config import ModelConfig
from nexus.data.cache import fingerprint as hash_json
from nexus.errors import CheckpointError, ConfigError
from nexus.model.transformer import Transformer
from nexus.training.config import TrainConfig
from nexus.training.datamodule import MixtureDataModule
from nexus.training.module import CausalLMModule, TokenThroughput
from nexus.training.progress import ProgressLog, quiet_lightning

MODEL_DIR, LIGHTNING_DIR, STAGE_FILE, LAST_CKPT = "model", "lightning", "stage.json", "last.ckpt"


@dataclass
class StageResult:
    checkpoint: Path
    """The final safetensors checkpoint directory."""
    metrics: dict[str, float]
    """Final train/val metrics (per-domain losses, routing shares, ...)."""
    global_step: int
    resumed_from_step: int | None
    """The step the run resumed at; None for a fresh run or an already finished stage."""
    fingerprint: str


def _readable_resume_checkpoint(ckpt: Path) -> bool:
    """A resume checkpoint cut short by a crash is moved aside (`.corrupt`) and the stage restarts from
    step 0 (deterministic, so it ends where an uninterrupted run would) instead of failing on it."""
    try:
        torch.load(ckpt, map_location="cpu", weights_only=True)
        return True
    except Exception as err:
        warnings.warn(
            f"{ckpt}: unreadable resume checkpoint ({type(err).__name__}: {err}); moved to "
            f"{ckpt.name}.corrupt, the stage restarts from step 0",
            stacklevel=2,
        )
        os.replace(ckpt, ckpt.with_name(ckpt.name + ".corrupt"))
        return False


def train_dense(
    config: TrainConfig,
    data: MixtureDataModule,
    out_dir: str | os.PathLike,
    *,
    init_checkpoint: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
    loggers: Sequence[Logger] = (),
    callbacks: Sequence[Callback] = (),
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> StageResult:
    """Train a dense model: from scratch (`model_config`, the seed) or from `init_checkpoint` (an expert)."""
    if (init_checkpoint is None) == (model_config is None):
        raise ConfigError("train_dense needs exactly one of init_checkpoint (expert) or model_config (seed)")
    if model_config is not None and model_config.is_moe:
        raise ConfigError("train_dense got an MoE model_config; use train_moe")
    return _run_stage(
        "dense",
        config,
        data,
        Path(out_dir),
        init_checkpoint,
        model_config,
        loggers,
        callbacks,
        metadata,
        extra_files,
    )


def train_moe(
    config: TrainConfig,
    data: MixtureDataModule,
    out_dir: str | os.PathLike,
    *,
    init_checkpoint: str | os.PathLike,
    loggers: Sequence[Logger] = (),
    callbacks: Sequence[Callback] = (),
    metadata: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> StageResult:
    """Train an MoE checkpoint (upcycled or extended); the auxiliary losses join the LM loss."""
    return _run_stage(
        "moe", config, data, Path(out_dir), init_checkpoint, None, loggers, callbacks, metadata, extra_files
    )


def _init_identity(init_checkpoint: str | os.PathLike | None, model_config: ModelConfig | None) -> dict:
    if init_checkpoint is None:
        return {"model": model_config.to_dict()}  # type: ignore[union-attr]
    meta = read_checkpoint_config(init_checkpoint)
    return {"init_sha256": meta.get("sha256", {}).get(WEIGHTS), "model": meta["model"]}


def _build_model(kind: str, init_checkpoint, model_config: ModelConfig | None) -> Transformer:
    model = load_checkpoint(init_checkpoint) if init_checkpoint is not None else Transformer(model_config)
    if model.config.is_moe != (kind == "moe"):
        raise CheckpointError(
            f"{init_checkpoint}: a {'MoE' if model.config.is_moe else 'dense'} model "
            f"cannot be trained by train_{kind}"
        )
    return model


def _check_stage_dir(out_dir: Path, fp: str) -> None:
    """Claim `out_dir` for fingerprint `fp`, refusing one that holds another stage's checkpoints."""
    stage_file = out_dir / STAGE_FILE
    if stage_file.is_file():
        previous = json.loads(stage_file.read_text()).get("fingerprint")
        if previous != fp and (out_dir / LIGHTNING_DIR).exists():
            raise ConfigError(
                f"{out_dir} holds a stage run with other settings (fingerprint {previous[:12]}, "
                f"now {fp[:12]}); use a new output directory or delete {out_dir / LIGHTNING_DIR}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_file.write_text(json.dumps({"fingerprint": fp}))


def _finished(out_dir: Path, fp: str) -> StageResult | None:
    try:
        meta = read_checkpoint_config(out_dir / MODEL_DIR)["metadata"]
    except CheckpointError:
        return None
    if meta.get("stage_fingerprint") != fp:
        return None
    return StageResult(out_dir / MODEL_DIR, meta["metrics"], meta["global_step"], None, fp)


def _scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


def _strategy(config: TrainConfig) -> Any:
    if config.num_devices == 1:
        return "auto"
    if config.strategy == "fsdp":  # FSDP2 (`fully_shard`, applied in CausalLMModule.configure_model); CPU too
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=config.num_devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return "ddp"


def build_trainer(
    config: TrainConfig, out_dir: Path, loggers: Sequence[Logger] = (), callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """The Trainer every stage uses: resume checkpoints in `out_dir/lightning`, step-based validation,
    `grad_accum_steps` micro-batches per optimizer step."""
    ckpt = ModelCheckpoint(
        dirpath=out_dir / LIGHTNING_DIR,
        every_n_train_steps=config.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    accumulate = config.grad_accum_steps
    quiet_lightning()
    progress = ProgressLog(f"{out_dir.parent.name}/{out_dir.name}")
    return L.Trainer(
        max_steps=config.max_steps,
        accelerator=config.accelerator,
        devices=config.num_devices,
        strategy=_strategy(config),
        precision=config.resolved_precision(),  # type: ignore[arg-type]
        accumulate_grad_batches=accumulate,
        gradient_clip_val=config.grad_clip or None,
        val_check_interval=config.val_every_n_steps * accumulate,  # counted in micro-batches
        check_val_every_n_epoch=None,
        limit_val_batches=config.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=config.log_every_n_steps,
        callbacks=[TokenThroughput(), progress, *callbacks, ckpt],
        logger=list(loggers) or False,
        default_root_dir=out_dir,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def _run_stage(
    kind: str,
    config: TrainConfig,
    data: MixtureDataModule,
    out_dir: Path,
    init_checkpoint,
    model_config: ModelConfig | None,
    loggers: Sequence[Logger],
    callbacks: Sequence[Callback],
    metadata: dict[str, Any] | None,
    extra_files: dict[str, str | os.PathLike] | None,
) -> StageResult:
    if data.max_steps != config.max_steps or data.batch_size != config.batch_size:
        raise ConfigError(
            f"data module (max_steps={data.max_steps}, batch_size={data.batch_size}) disagrees "
            f"with the train config ({config.max_steps}, {config.batch_size})"
        )
    fp = hash_json(
        {
            "kind": kind,
            "train": config.identity(),
            "data": data.describe(),
            "init": _init_identity(init_checkpoint, model_config),
        }
    )
    done = _finished(out_dir, fp)
    if done is not None:
        return done
    _check_stage_dir(out_dir, fp)

    L.seed_everything(config.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    data.micro_batches = config.grad_accum_steps
    module = CausalLMModule(_build_model(kind, init_checkpoint, model_config), config, data.domain_names)
    trainer = build_trainer(config, out_dir, loggers, callbacks)
    last = out_dir / LIGHTNING_DIR / LAST_CKPT
    resuming = last.is_file() and _readable_resume_checkpoint(last)
    # weights_only=True: the checkpoint holds only tensors and plain containers (see module doc).
    trainer.fit(module, datamodule=data, ckpt_path=last if resuming else None, weights_only=True)
    resumed = module.start_step if resuming else None
    metrics = _scalars(trainer.callback_metrics)
    if module.last_val_step != trainer.global_step:  # the final metrics include a final validation
        trainer.validate(module, datamodule=data, verbose=False)
        metrics.update(_scalars(trainer.callback_metrics))

    parallel = {
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "sharded": is_sharded(module.model),
    }
    state = full_state_dict(module.model)  # a collective under FSDP: every rank takes part
    if trainer.is_global_zero:
        with torch.device("meta"):  # no second initialisation: the gathered tensors are assigned
            final = Transformer(module.model.config)
        final.load_state_dict(state, strict=not final.config.tie_embeddings, assign=True)
        save_checkpoint(
            final.to(getattr(torch, config.save_dtype)),
            out_dir / MODEL_DIR,
            extra_files=extra_files,
            metadata={
                **(metadata or {}),
                "stage": kind,
                "stage_fingerprint": fp,
                "global_step": trainer.global_step,
                "metrics": metrics,
                "train_config": config.to_dict(),
                "data": data.describe(),
                "parallel": parallel,
                "init_checkpoint": str(init_checkpoint) if init_checkpoint is not None else None,
            },
        )
        load_checkpoint(out_dir / MODEL_DIR)  # checksum and every tensor: only then drop the resume state
        shutil.rmtree(out_dir / LIGHTNING_DIR, ignore_errors=True)
    trainer.strategy.barrier()
    return StageResult(out_dir / MODEL_DIR, metrics, trainer.global_step, resumed, fp)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 holds the parameters as shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, parameter names as in the checkpoint. Under FSDP2 the
    shards are gathered (a collective: call it on every rank; ranks other than 0 get `{}`)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
