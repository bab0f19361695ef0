"""Fixtures of the training tests."""

import lightning as L
import pytest


@pytest.fixture
def cpu_trainer():
    """`cpu_trainer(**kw)`: a one-CPU Lightning Trainer without loggers, bars, summaries, checkpoints or
    sanity validation; `kw` adds or overrides Trainer arguments."""

    def make(**kw) -> L.Trainer:
        return L.Trainer(
            **{
                "accelerator": "cpu",
                "devices": 1,
                "logger": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "enable_checkpointing": False,
                "num_sanity_val_steps": 0,
                **kw,
            }
        )

    return make
