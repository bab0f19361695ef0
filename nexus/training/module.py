"""One LightningModule for causal-LM training of dense and MoE transformers.

    loss = CE(logits, next tokens) + aux_loss        (aux_loss = 0 for a dense model)

The module receives a built `Transformer`; it never constructs one. Batches are
`(tokens: (B, T+1) int64, domain_ids: (B,) int64)`; inputs and shifted targets come from one slice.
Validation accumulates token-weighted loss per domain and, for an MoE, routing counts per
(layer, domain, expert), reduced over ranks once per validation epoch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from nexus.model.transformer import Transformer, causal_lm_loss
from nexus.training.config import TrainConfig
from nexus.training.freeze import FrozenRows, apply_trainable
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
        self._compiled = False
        self.frozen_rows: FrozenRows | None = None

    def configure_model(self) -> None:
        if self.config.compile and not self._compiled:
            self.model.compile()  # in place: parameter names stay those of the checkpoint
            self._compiled = True

    def forward(self, idx: torch.Tensor):
        return self.model(idx)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, _ = batch
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = self.model(x)
        lm_loss = causal_lm_loss(out.logits, y)
        # Only on the steps the Trainer sends to loggers: each self.log call costs milliseconds.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", lm_loss, prog_bar=True)
            metrics = {"train/lr": self.lr_schedulers().get_last_lr()[0]}
            if out.routing:
                n = len(out.routing)
                metrics.update({"train/aux_loss": out.aux_loss,
                                "train/load_balance_loss": sum(r.load_balance_loss for r in out.routing) / n,
                                "train/z_loss": sum(r.z_loss for r in out.routing) / n})
            self.log_dict(metrics)
        return lm_loss + out.aux_loss

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
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)
        scheduler = warmup_cosine_scheduler(optimizer, self.config.max_steps, self.config.warmup_steps,
                                            self.config.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        n = len(self.domain_names)
        self._val_loss = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_routing: torch.Tensor | None = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        tokens, domains = batch
        x, y = tokens[:, :-1], tokens[:, 1:]
        out = self.model(x)
        nll = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        self._val_loss.index_add_(0, domains, nll.view_as(y).sum(1).double())
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
            self.log_dict(metrics)
            self.log("val_loss", metrics.get("val/loss", float("nan")), prog_bar=True, logger=False)
        self.last_val_step = self.trainer.global_step


class TokenThroughput(L.Callback):
    """Logs `train/tokens_per_s`: target tokens over the time spent in training steps (forward,
    backward, optimizer), excluding data loading, validation and checkpointing, summed over ranks."""

    def __init__(self) -> None:
        self._tokens, self._seconds, self._t0 = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._seconds += time.perf_counter() - self._t0
        self._tokens += batch[0][:, 1:].numel()
        if trainer.global_step % trainer.log_every_n_steps == 0 and self._seconds > 0:
            pl_module.log("train/tokens_per_s", trainer.world_size * self._tokens / self._seconds)
            self._tokens, self._seconds = 0, 0.0
