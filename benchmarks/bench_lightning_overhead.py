"""Training throughput through the stages' Lightning Trainer vs. a bare PyTorch loop.

Both run the same model (same init), the same DataLoader over the same mixture, the same AdamW
param groups, warmup-cosine schedule and gradient clipping, in fp32. Lightning runs the exact
Trainer the stage functions build (`build_trainer`) with validation and checkpointing pushed past
the end, so the difference is the Trainer's own per-step cost. Throughput is measured over the
steps after `--warmup`, as wall time and as process CPU time (the steadier figure on a shared
machine; one torch thread, DataLoader in-process); repeats are interleaved and the best is reported.

    python benchmarks/bench_lightning_overhead.py [--steps 60 --warmup 10 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from nexus.config import ModelConfig, tiny
from nexus.model.transformer import Transformer, causal_lm_loss
from nexus.training import CausalLMModule, MixtureDataModule, TrainConfig
from nexus.training.stages import build_trainer
from nexus.training.synthetic import synthetic_splits

DOMAINS = ["a", "b", "c", "d"]


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _now()
    return wall - t0[0], cpu - t0[1]


class WindowTimer(L.Callback):
    """(wall, cpu) seconds from the start of step `warmup` to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.seconds = warmup, (0.0, 0.0), (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = _now()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = _since(self.t0)


def _setup(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[CausalLMModule, MixtureDataModule]:
    train, val = synthetic_splits(DOMAINS, model_cfg.max_seq_len, model_cfg.vocab_size, n_train=256)
    data = MixtureDataModule(train, val, dict.fromkeys(DOMAINS, 1.0), cfg.batch_size, cfg.max_steps)
    torch.manual_seed(0)
    return CausalLMModule(Transformer(model_cfg), cfg, data.domain_names), data


def bare(model_cfg: ModelConfig, cfg: TrainConfig, warmup: int) -> tuple[float, float]:
    module, data = _setup(model_cfg, cfg)
    model = module.model.train()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    t0 = _now()
    for step, (tokens, _) in enumerate(data.train_dataloader()):
        if step == warmup:
            t0 = _now()
        out = model(tokens[:, :-1])
        loss = causal_lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
    return _since(t0)


def lightning(model_cfg: ModelConfig, cfg: TrainConfig, warmup: int) -> tuple[float, float]:
    module, data = _setup(model_cfg, cfg)
    timer = WindowTimer(warmup)
    with tempfile.TemporaryDirectory() as out:
        build_trainer(cfg, Path(out), callbacks=[timer]).fit(module, datamodule=data)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; >1 on a loaded 2-core machine makes OpenMP spin and timings meaningless",
    )
    parser.add_argument("--out", default="benchmarks/results/lightning_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        val_every_n_steps=10 * args.steps,
        checkpoint_every_n_steps=10 * args.steps,
        log_every_n_steps=10,
        progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    models = {"dense tiny": tiny(), "moe tiny (4 experts)": tiny().with_moe(expert_names=DOMAINS)}
    tokens = (args.steps - args.warmup) * args.batch_size * tiny().max_seq_len
    rows = []
    for name, model_cfg in models.items():
        runs: dict[str, list[tuple[float, float]]] = {"bare": [], "lightning": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            runs["bare"].append(bare(model_cfg, cfg, args.warmup))
            runs["lightning"].append(lightning(model_cfg, cfg, args.warmup))
        row: dict = {"model": name}
        for i, clock in enumerate(("wall", "cpu")):
            best = {k: min(r[i] for r in v) for k, v in runs.items()}
            row |= {
                f"bare_tokens_per_s_{clock}": tokens / best["bare"],
                f"lightning_tokens_per_s_{clock}": tokens / best["lightning"],
                f"ratio_{clock}": best["bare"] / best["lightning"],
                f"bare_s_{clock}": [r[i] for r in runs["bare"]],
                f"lightning_s_{clock}": [r[i] for r in runs["lightning"]],
            }
        rows.append(row)

    print(f"{'model':22} {'clock':5} {'bare tok/s':>11} {'lightning tok/s':>16} {'lightning/bare':>15}")
    for r in rows:
        for clock in ("wall", "cpu"):
            print(
                f"{r['model']:22} {clock:5} {r[f'bare_tokens_per_s_{clock}']:11.0f} "
                f"{r[f'lightning_tokens_per_s_{clock}']:16.0f} {r[f'ratio_{clock}']:15.3f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "timed_tokens": tokens,
                "torch": torch.__version__,
                "lightning": L.__version__,
                "threads": torch.get_num_threads(),
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
