"""One LightningModule for causal-LM training of dense and MoE transformers.

    loss = CE(logits, next tokens) + aux_loss        (aux_loss = 0 for a dense model)

The module receives a built `Transformer`; it never constructs one. Batches are
`(tokens: (B, T+1) int64, domain_ids: (B,) int64)`; inputs and shifted targets come from one slice.
The cross-entropy is computed from the final hidden states `loss_chunk_tokens` at a time
(`nexus.training.loss`), so the (tokens, vocab) logits never exist. Under data parallelism the
load-balancing loss uses the expert counts summed over ranks (one all-reduce per step), so a
DDP step computes what one process with the global batch would. Validation accumulates
token-weighted loss per domain and, for an MoE, routing counts per (layer, domain, expert),
reduced over ranks once per validation epoch.

`configure_model` applies, in this order, activation checkpointing (per block), FSDP2 sharding
(per block, then the root; under `strategy: fsdp`) and `torch.compile`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from nexus.model.moe import load_balance_loss
from nexus.model.transformer import Block, ModelOutput, Transformer
from nexus.training.config import TrainConfig
from nexus.training.freeze import FrozenRows, apply_trainable
from nexus.training.loss import chunked_cross_entropy
from nexus.training.routing_stats import routing_counts, share_metrics
from nexus.training.schedule import warmup_cosine_scheduler


class CausalLMModule(L.LightningModule):
    def __init__(self, model: Transformer, config: TrainConfig, domain_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.domain_names = list(domain_names)
        moe = model.config.moe
        self.expert_names = list(moe.expert_names) if moe is not None else []
        self.last_val_step = -1
        self.start_step = 0
        """The global step `fit` started at: > 0 when it resumed from a Lightning checkpoint."""
        self._configured = False
        self.frozen_rows: FrozenRows | None = None

    def configure_model(self) -> None:
        if self._configured:  # Lightning calls it again for every fit/validate
            return
        self._configured = True
        if self.config.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
            )

            # the wrapper's state-dict hooks keep parameter names those of the checkpoint
            apply_activation_checkpointing(self.model, check_fn=lambda m: isinstance(m, Block))
        if self.config.strategy == "fsdp" and self.config.num_devices > 1:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        if self.config.compile:
            self.model.compile()  # in place: parameter names stay those of the checkpoint

    def forward(self, idx: torch.Tensor):
        return self.model(idx)

    def lm_loss(self, out: ModelOutput, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy from the final hidden states, `loss_chunk_tokens` at a time."""
        return chunked_cross_entropy(
            out.hidden, self.model.lm_head.weight, targets, self.config.loss_chunk_tokens, reduction
        )

    def aux_loss(self, out: ModelOutput) -> torch.Tensor:
        """The MoE auxiliary loss; with several ranks, load balancing over the global batch's counts."""
        if not out.routing or self.trainer.world_size == 1:
            return out.aux_loss
        moe = self.model.config.moe
        counts = self.trainer.strategy.reduce(torch.stack([r.counts for r in out.routing]), reduce_op="sum")
        return sum(
            moe.load_balance_coef * load_balance_loss(r.probs, r.expert_index, c) + moe.z_loss_coef * r.z_loss
            for r, c in zip(out.routing, counts)
        )

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, _ = batch
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = self.model(x, logits=False)
        lm_loss = self.lm_loss(out, y)
        aux_loss = self.aux_loss(out)
        # Only on the steps the Trainer sends to loggers: each self.log call costs milliseconds.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", lm_loss, prog_bar=True)
            metrics = {"train/lr": self.lr_schedulers().get_last_lr()[0]}
            if out.routing:
                n = len(out.routing)
                metrics.update(
                    {
                        "train/aux_loss": aux_loss,
                        "train/load_balance_loss": sum(r.load_balance_loss for r in out.routing) / n,
                        "train/z_loss": sum(r.z_loss for r in out.routing) / n,
                    }
                )
            self.log_dict(metrics)
        return lm_loss + aux_loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.frozen_rows is not None:  # after the optimizer step: undo weight decay on frozen rows
            self.frozen_rows.restore()

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters (`config.trainable`); matrices decay, vectors (norm gains)
        do not."""
        self.frozen_rows = apply_trainable(self.model, self.config.trainable)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)
        scheduler = warmup_cosine_scheduler(
            optimizer, self.config.max_steps, self.config.warmup_steps, self.config.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        n = len(self.domain_names)
        self._val_loss = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_routing: torch.Tensor | None = None

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        tokens, domains = batch
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = self.model(x, logits=False)
        nll = self.lm_loss(out, y, reduction="none")
        self._val_loss.index_add_(0, domains, nll.sum(1).double())
        self._val_tokens.index_add_(0, domains, torch.full_like(domains, y.shape[1]).double())
        if out.routing:
            token_domains = domains.repeat_interleave(x.shape[1])
            counts = routing_counts(out.routing, token_domains, len(self.domain_names))
            self._val_routing = counts if self._val_routing is None else self._val_routing + counts

    def on_validation_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        loss_sum, tokens = reduce(self._val_loss, reduce_op="sum"), reduce(self._val_tokens, reduce_op="sum")
        metrics: dict[str, float] = {}
        for d, name in enumerate(self.domain_names):
            if tokens[d] > 0:
                loss = (loss_sum[d] / tokens[d]).item()
                metrics[f"val/{name}/loss"] = loss
                metrics[f"val/{name}/ppl"] = math.exp(min(loss, 50.0))
        if tokens.sum() > 0:
            metrics["val/loss"] = (loss_sum.sum() / tokens.sum()).item()
        if self._val_routing is not None:
            counts = reduce(self._val_routing, reduce_op="sum")
            metrics.update(share_metrics(counts, self.domain_names, self.expert_names))
        if metrics and not self.trainer.sanity_checking:
            with (
                warnings.catch_warnings()
            ):  # reduced over ranks above: Lightning's sync_dist hint does not apply
                warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
                self.log_dict(metrics)
                self.log("val_loss", metrics.get("val/loss", float("nan")), prog_bar=True, logger=False)
        self.last_val_step = self.trainer.global_step


class TokenThroughput(L.Callback):
    """Logs `train/tokens_per_s`: target tokens over the time spent in training steps (forward,
    backward, optimizer), excluding data loading, validation and checkpointing, summed over ranks."""

    def __init__(self) -> None:
        self._tokens, self._seconds, self._t0 = 0, 0.0, 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seconds += time.perf_counter() - self._t0
        self._tokens += batch[0][:, 1:].numel()
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._seconds > 0:
            pl_module.log("train/tokens_per_s", trainer.world_size * self._tokens / self._seconds)
            self._tokens, self._seconds = 0, 0.0
