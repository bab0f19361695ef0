"""Training progress as log lines: step, loss, tokens/s and ETA, without Lightning's banner lines."""

import logging

from nexus.config import tiny
from nexus.training import MixtureDataModule, TrainConfig, train_dense
from nexus.training.progress import ProgressLog
from nexus.training.synthetic import synthetic_splits

TRAIN, VAL = synthetic_splits(["a"], seq_len=16, vocab_size=96, n_train=32, n_val=4)


def test_a_stage_logs_its_progress_and_not_lightnings_banners(tmp_path, caplog):
    cfg = TrainConfig(max_steps=6, batch_size=4, val_every_n_steps=6, limit_val_batches=1, progress_bar=False)
    data = MixtureDataModule(TRAIN, VAL, {"a": 1.0}, cfg.batch_size, cfg.max_steps)
    with caplog.at_level(logging.INFO):
        train_dense(cfg, data, tmp_path / "experts" / "a", model_config=tiny(max_seq_len=16))
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus.training"]
    assert lines[-1].startswith("experts/a: step 6/6 (100%)  loss "), lines
    assert all("tok/s" in line and "ETA" in line for line in lines) and len(lines) == 6  # every step of 6
    assert not any("GPU available" in r.getMessage() for r in caplog.records)


def test_the_line_reads_like_a_progress_bar():
    progress = ProgressLog("moe/nexus", every=10)
    text = progress.line(40, 160, 4.1234)
    assert text.startswith("moe/nexus: step 40/160 (25%)  loss 4.123  ") and "ETA" in text
