"""`python -m nexus.training.run_stage SPEC.json`: one training stage, described by a JSON file.

This is the program every process of a multi-device stage runs (`nexus.training.launch` starts it
under torchrun, one process per device), so distributed training re-executes this entry point and
nothing else: never the CLI or the flow that asked for the stage. Rank 0 writes the result (or the
error) to `result_path` as JSON; the exit code is 0, 2 for a `NexusError` (bad input), 1 otherwise.

A spec names its data by prepared-data directory (or synthetic domains, for tests and benchmarks)
and may name a Lightning logger factory by import path (`"package.module:function"`, called with
`logger_kwargs` in the stage process): that is how `flows` logs a stage's metrics into its MLflow run
while `nexus` imports no tracking library.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexus import errors

PARENT_PID_ENV = "NEXUS_STAGE_PARENT_PID"


@dataclass
class StageSpec:
    kind: str
    """"dense" (seed or expert) or "moe" (upcycled or extended MoE)."""
    train: dict[str, Any]
    """`TrainConfig` fields."""
    data: dict[str, Any]
    """{"dir", "weights", "val_domains", "extra_dirs"} of prepared data, or {"synthetic": {domains,
    seq_len, vocab_size, n_train, n_val, seed}, "weights": ...}."""
    out_dir: str
    init_checkpoint: str | None = None
    model: dict[str, Any] | None = None
    """A `ModelConfig` as a dict (a seed trained from scratch), instead of `init_checkpoint`."""
    metadata: dict[str, Any] | None = None
    extra_files: dict[str, str] = field(default_factory=dict)
    logger: str | None = None
    """"module:function" returning a Lightning logger, called with `logger_kwargs`."""
    logger_kwargs: dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 0
    result_path: str | None = None
    """Where rank 0 writes the result JSON (default `<out_dir>/stage-result.json`)."""

    @property
    def result_file(self) -> Path:
        return Path(self.result_path or Path(self.out_dir) / "stage-result.json")

    def save(self, path: str | os.PathLike) -> Path:
        from nexus.io import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StageSpec:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise errors.ConfigError(f"{path}: not a stage spec ({err})") from err


def data_module(spec: StageSpec):
    """The stage's `MixtureDataModule`, from prepared data or synthetic domains."""
    from nexus.training.config import TrainConfig
    from nexus.training.datamodule import MixtureDataModule, packed_data_module

    cfg, data = TrainConfig(**spec.train), spec.data
    if "synthetic" in data:
        from nexus.training.synthetic import synthetic_splits

        train, val = synthetic_splits(**data["synthetic"])
        return MixtureDataModule(
            train,
            val,
            data["weights"],
            cfg.batch_size,
            cfg.max_steps,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
        )
    return packed_data_module(
        data["dir"],
        data["weights"],
        cfg.batch_size,
        cfg.max_steps,
        cfg.seed,
        data.get("val_domains"),
        data.get("extra_dirs"),
        cfg.num_workers,
    )


def run_spec(spec: StageSpec, loggers: list | None = None):
    """Train the stage in this process (one rank of it under torchrun); returns the `StageResult`."""
    import torch

    from nexus import training
    from nexus.config import ModelConfig
    from nexus.training.config import TrainConfig

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    if spec.kind not in ("dense", "moe"):
        raise errors.ConfigError(f"stage spec: kind must be 'dense' or 'moe', got {spec.kind!r}")
    cfg = TrainConfig(**spec.train)
    if loggers is None and spec.logger:
        module_name, _, fn = spec.logger.partition(":")
        loggers = [getattr(importlib.import_module(module_name), fn)(**spec.logger_kwargs)]
    kwargs: dict[str, Any] = {
        "loggers": loggers or [],
        "metadata": spec.metadata,
        "extra_files": spec.extra_files,
    }
    if spec.kind == "moe":
        return training.train_moe(
            cfg, data_module(spec), spec.out_dir, init_checkpoint=spec.init_checkpoint, **kwargs
        )
    model = ModelConfig.from_dict(spec.model, "stage spec: model") if spec.model is not None else None
    return training.train_dense(
        cfg,
        data_module(spec),
        spec.out_dir,
        init_checkpoint=spec.init_checkpoint,
        model_config=model,
        **kwargs,
    )


def result_dict(result: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(result.checkpoint),
        "metrics": result.metrics,
        "global_step": result.global_step,
        "resumed_from_step": result.resumed_from_step,
        "fingerprint": result.fingerprint,
    }


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a killed flow leaves no stage behind);
    exit at once if the parent that started it is already gone."""
    import signal

    # a stopped stage exits at once: a rank that waited for the next step could sit in a collective
    # whose peer is gone (gloo's timeout is 30 minutes); Lightning chains this handler after its own
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    from nexus.io import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nexus.training.run_stage SPEC.json", file=sys.stderr)
        return 2
    die_with_parent()
    spec = StageSpec.load(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        payload, code = result_dict(run_spec(spec)), 0
    except errors.NexusError as err:
        payload, code = {"error": {"type": type(err).__name__, "message": str(err)}}, 2
    except Exception as err:
        traceback.print_exc()
        payload, code = {"error": {"type": type(err).__name__, "message": str(err)[:2000]}}, 1
    if rank == 0:
        atomic_write_text(spec.result_file, json.dumps(payload, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
