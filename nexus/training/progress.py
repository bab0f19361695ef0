"""Progress of a training stage as log lines (logger `nexus.training`), readable in a terminal and in a
Prefect worker's or the UI's flow-run log alike (the flows add `nexus` to Prefect's loggers):

    expert-lore: step 40/150 (27%)  loss 4.127  1,980 tok/s  elapsed 0:21  ETA 0:58

Lightning's own banner lines (accelerator availability, the `max_steps` reached note), which every
stage would repeat, are kept below WARNING (`quiet_lightning`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger("nexus.training")
LIGHTNING_CHATTER = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog(L.Callback):
    """Logs step, loss, tokens/s (wall clock, data loading included) and ETA every `every` steps
    (default: about 20 lines per stage), and a last line when training ends. Rank zero only."""

    def __init__(self, name: str, every: int | None = None) -> None:
        self.name, self.every = name, every
        self._start, self._tokens, self._first_step = 0.0, 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._tokens, self._first_step = time.perf_counter(), 0, trainer.global_step
        self.every = self.every or max(1, trainer.max_steps // 20)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += batch[0][:, 1:].numel() * trainer.world_size
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == trainer.max_steps):
            log.info(self.line(step, trainer.max_steps, _loss(outputs)))

    def line(self, step: int, max_steps: int, loss: float | None) -> str:
        elapsed = time.perf_counter() - self._start
        done = max(step - self._first_step, 1)
        eta = elapsed / done * max(max_steps - step, 0)
        loss_text = f"loss {loss:.3f}  " if loss is not None else ""
        return (
            f"{self.name}: step {step}/{max_steps} ({step / max_steps:.0%})  {loss_text}"
            f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
        )


def _loss(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss) if loss is not None and getattr(loss, "numel", lambda: 0)() == 1 else None


def quiet_lightning() -> None:
    """Lightning's per-Trainer info lines (which every stage would repeat) below WARNING, process-wide."""
    for name in LIGHTNING_CHATTER:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))
