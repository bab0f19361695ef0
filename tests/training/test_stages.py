"""Stage functions through the real Lightning Trainer: outputs, resume after a crash, idempotence."""

import lightning as L
import pytest
import torch

from nexus.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.config import tiny
from nexus.errors import CheckpointError, ConfigError
from nexus.model.transformer import Transformer
from nexus.training import MixtureDataModule, TrainConfig, train_dense, train_moe
from nexus.training.synthetic import synthetic_splits

TRAIN, VAL = synthetic_splits(["a", "b"], seq_len=16, vocab_size=96, n_train=32, n_val=4)
CFG = TrainConfig(
    max_steps=8,
    batch_size=4,
    val_every_n_steps=4,
    limit_val_batches=1,
    log_every_n_steps=2,
    checkpoint_every_n_steps=2,
    progress_bar=False,
)
MODEL = tiny(max_seq_len=16)


def _data(weights=None, cfg=CFG):
    return MixtureDataModule(TRAIN, VAL, weights or {"a": 1.0}, cfg.batch_size, cfg.max_steps)


class Crash(L.Callback):
    """Raises when step `at` is about to start (steps 1..at have run, their checkpoint is written)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError(f"killed at step {self.at}")


def _state(path):
    return load_checkpoint(path).state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted seed stage, shared by the tests that compare with it."""
    return train_dense(CFG, _data(), tmp_path_factory.mktemp("ref") / "seed", model_config=MODEL)


def test_dense_stage_writes_a_checkpoint_with_metrics(reference):
    assert reference.global_step == 8 and reference.resumed_from_step is None
    assert {"train/loss", "val/loss", "val/a/loss", "val/b/loss", "train/tokens_per_s"} <= set(
        reference.metrics
    )
    meta = read_checkpoint_config(reference.checkpoint)["metadata"]
    assert meta["global_step"] == 8 and meta["stage"] == "dense" and meta["train_config"]["lr"] == CFG.lr
    assert not (reference.checkpoint.parent / "lightning").exists()  # resume state is dropped once finished
    assert torch.isfinite(torch.tensor(reference.metrics["val/loss"]))


def test_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, reference):
    with pytest.raises(RuntimeError, match="killed at step 4"):
        train_dense(CFG, _data(), tmp_path / "run", model_config=MODEL, callbacks=[Crash(at=4)])
    assert (tmp_path / "run" / "lightning" / "last.ckpt").is_file() and not (
        tmp_path / "run" / "model"
    ).exists()

    resumed = train_dense(CFG, _data(), tmp_path / "run", model_config=MODEL)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step >= 4
    assert resumed.global_step == CFG.max_steps
    # same batches, same optimizer and schedule state: bit-identical to the uninterrupted run
    want, got = _state(reference.checkpoint), _state(resumed.checkpoint)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.metrics["val/loss"] == pytest.approx(reference.metrics["val/loss"])


def test_finished_stage_is_returned_without_training(reference):
    again = train_dense(
        CFG, _data(), reference.checkpoint.parent, model_config=MODEL, callbacks=[Crash(at=0)]
    )
    assert again.checkpoint == reference.checkpoint and again.global_step == 8
    assert again.metrics == reference.metrics and again.fingerprint == reference.fingerprint


def test_other_settings_in_a_used_directory_are_refused(tmp_path):
    with pytest.raises(RuntimeError):
        train_dense(CFG, _data(), tmp_path / "run", model_config=MODEL, callbacks=[Crash(at=2)])
    with pytest.raises(ConfigError, match="other settings"):
        train_dense(CFG, _data({"b": 1.0}), tmp_path / "run", model_config=MODEL)


def test_expert_from_seed_and_moe_stage(tmp_path):
    cfg = TrainConfig(**{**CFG.to_dict(), "max_steps": 3})
    seed = tmp_path / "seed"
    save_checkpoint(Transformer(MODEL), seed)
    expert = train_dense(cfg, _data({"b": 1}, cfg), tmp_path / "expert", init_checkpoint=seed)
    assert read_checkpoint_config(expert.checkpoint)["metadata"]["init_checkpoint"] == str(seed)
    with pytest.raises(CheckpointError, match="train_moe"):
        train_moe(cfg, _data(None, cfg), tmp_path / "moe", init_checkpoint=seed)

    moe_ckpt = tmp_path / "moe-init"
    save_checkpoint(Transformer(MODEL.with_moe(expert_names=["a", "b"], router="linear")), moe_ckpt)
    moe = train_moe(cfg, _data({"a": 1, "b": 1}, cfg), tmp_path / "moe", init_checkpoint=moe_ckpt)
    assert moe.global_step == 3 and "val/routing/mean/a/b" in moe.metrics and "train/aux_loss" in moe.metrics


def test_argument_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        train_dense(CFG, _data(), "unused")
    with pytest.raises(ConfigError, match="MoE model_config"):
        train_dense(CFG, _data(), "unused", model_config=MODEL.with_moe(expert_names=["a"]))
    with pytest.raises(ConfigError, match="disagrees"):
        train_dense(TrainConfig(max_steps=9, batch_size=4), _data(), "unused", model_config=MODEL)


def _max_difference(a, b) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_gradient_accumulation_trains_on_the_same_batches(tmp_path, reference):
    """Two micro-batches of 2 per step: the same rows, steps and validation as one batch of 4."""
    cfg = TrainConfig(**{**CFG.to_dict(), "grad_accum_steps": 2})
    result = train_dense(cfg, _data(cfg=cfg), tmp_path / "accum", model_config=MODEL)
    assert result.global_step == CFG.max_steps and "val/loss" in result.metrics
    assert result.fingerprint != reference.fingerprint  # a different recipe, fp-close result
    assert _max_difference(_state(result.checkpoint), _state(reference.checkpoint)) < 1e-5
    assert result.metrics["val/loss"] == pytest.approx(reference.metrics["val/loss"], rel=1e-5)


def test_activation_checkpointing_and_chunked_loss_change_memory_not_the_model(tmp_path, reference):
    cfg = TrainConfig(**{**CFG.to_dict(), "activation_checkpointing": True, "loss_chunk_tokens": 7})
    result = train_dense(cfg, _data(cfg=cfg), tmp_path / "lean", model_config=MODEL)
    assert result.fingerprint == reference.fingerprint  # runtime settings: the same stage
    assert set(_state(result.checkpoint)) == set(_state(reference.checkpoint))  # no wrapper prefixes
    assert _max_difference(_state(result.checkpoint), _state(reference.checkpoint)) < 1e-5


def test_bf16_checkpoint_holds_the_trained_weights_rounded(tmp_path, reference):
    from safetensors import safe_open

    cfg = TrainConfig(**{**CFG.to_dict(), "save_dtype": "bfloat16"})
    result = train_dense(cfg, _data(cfg=cfg), tmp_path / "bf16", model_config=MODEL)
    with safe_open(str(result.checkpoint / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 - not a dict
    loaded, want = _state(result.checkpoint), _state(reference.checkpoint)
    assert all(v.dtype == torch.float32 for v in loaded.values())  # training continues in fp32
    assert all(torch.equal(loaded[k], want[k].bfloat16().float()) for k in want)


def test_resume_state_is_kept_when_the_final_checkpoint_does_not_load(tmp_path, monkeypatch):
    from nexus.training import stages

    def damaged(path, *args, **kwargs):
        raise CheckpointError(f"{path}: corrupt")

    monkeypatch.setattr(stages, "load_checkpoint", damaged)
    with pytest.raises(CheckpointError, match="corrupt"):
        train_dense(CFG, _data(), tmp_path / "run", model_config=MODEL)
    assert (tmp_path / "run" / "lightning" / "last.ckpt").is_file()
