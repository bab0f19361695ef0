"""Stages in their own processes (`nexus.training.launch`): real torchrun, two gloo ranks on CPU.

A two-rank stage must end where one process with the same global batch ends (every rank draws the
global batch and keeps its rows; the load-balancing loss uses the counts summed over ranks), under
DDP and under FSDP2, whose saved checkpoint must be the full model. The caller's environment gets
no distributed variable, and no process outlives the stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from nexus.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.config import tiny
from nexus.errors import CheckpointError
from nexus.model.transformer import Transformer
from nexus.training.launch import DISTRIBUTED_ENV, StageProcessError, launch_stage
from nexus.training.run_stage import StageSpec, run_spec

TRAIN = {
    "max_steps": 6,
    "batch_size": 4,
    "val_every_n_steps": 3,
    "limit_val_batches": 1,
    "log_every_n_steps": 2,
    "checkpoint_every_n_steps": 2,
    "progress_bar": False,
    "lr": 3e-3,
}
SYNTHETIC = {"domains": ["a", "b"], "seq_len": 16, "vocab_size": 96, "n_train": 32, "n_val": 4}
DATA = {"synthetic": SYNTHETIC, "weights": {"a": 1.0, "b": 1.0}}
MODEL = tiny(max_seq_len=16)


def _moe_init(path):
    torch.manual_seed(0)
    return str(save_checkpoint(Transformer(MODEL.with_moe(expert_names=["a", "b"], router="linear")), path))


def _max_difference(a, b) -> float:
    sa, sb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# the default suite runs FSDP (the same launcher, ranks and checks, plus the full save); DDP is slow-marked
# (30-40 s each on a loaded 2-core machine) and runs in the micro pipeline test too
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_rank_moe_stage_equals_one_process_with_the_global_batch(tmp_path, strategy):
    init = _moe_init(tmp_path / "init")
    before = _descendants()
    two = launch_stage(
        StageSpec(
            "moe",
            {**TRAIN, "devices": 2, "strategy": strategy},
            DATA,
            str(tmp_path / "two"),
            init_checkpoint=init,
            torch_threads=1,
        ),
        nproc=2,
    )
    assert _descendants() <= before, "a stage process outlived its stage"
    assert not set(DISTRIBUTED_ENV) & set(os.environ), "the distributed environment leaked into the caller"
    log = (tmp_path / "two" / "stage.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two ranks joined (Lightning's backend line is quieted)

    one = run_spec(
        StageSpec("moe", {**TRAIN, "batch_size": 8}, DATA, str(tmp_path / "one"), init_checkpoint=init)
    )
    assert two["global_step"] == one.global_step == TRAIN["max_steps"]
    difference = _max_difference(two["checkpoint"], one.checkpoint)
    print(f"{strategy}: max |two ranks - one process| over all weights = {difference:.2e}")
    assert difference < 1e-4
    assert two["metrics"]["val/loss"] == pytest.approx(one.metrics["val/loss"], rel=1e-4)
    meta = read_checkpoint_config(two["checkpoint"])["metadata"]
    assert meta["parallel"]["world_size"] == 2
    # FSDP held shards during training, and the checkpoint is still the full model (it loaded above)
    assert meta["parallel"]["sharded"] == (strategy == "fsdp")
    assert not (tmp_path / "two" / "lightning").exists()


@pytest.mark.slow
def test_bad_input_in_the_stage_process_raises_its_error_in_the_caller(tmp_path):
    spec = StageSpec("moe", TRAIN, DATA, str(tmp_path / "bad"), init_checkpoint=str(tmp_path / "missing"))
    with pytest.raises(Exception) as info:
        launch_stage(spec, nproc=1)
    assert isinstance(info.value, CheckpointError) and "missing" in str(info.value)


@pytest.mark.slow
def test_a_crashing_stage_process_reports_its_log(tmp_path):
    spec = StageSpec(
        "dense",
        TRAIN,
        {**DATA, "synthetic": {**DATA["synthetic"], "vocab_size": 10**9}},
        str(tmp_path / "crash"),
        model=MODEL.to_dict(),
    )
    with pytest.raises(StageProcessError, match="last lines of"):
        launch_stage(spec, nproc=1)


@pytest.mark.slow
def test_killing_the_caller_leaves_no_stage_process(tmp_path):
    """The caller (here a Python process running `launch_stage`) is SIGKILLed mid-training: the
    torchrun agent and both ranks exit with it."""
    spec = StageSpec(
        "dense",
        {**TRAIN, "max_steps": 400, "devices": 2, "strategy": "ddp"},
        DATA,
        str(tmp_path / "stage"),
        model=MODEL.to_dict(),
        torch_threads=1,
    )
    spec_file = spec.save(tmp_path / "spec.json")
    program = (
        "import sys; from nexus.training.launch import launch_stage; "
        "from nexus.training.run_stage import StageSpec; launch_stage(StageSpec.load(sys.argv[1]), nproc=2)"
    )
    caller = subprocess.Popen([sys.executable, "-c", program, str(spec_file)])
    deadline = time.time() + 120
    while not (tmp_path / "stage" / "lightning" / "last.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.5)
    stage_procs = list(psutil.Process(caller.pid).children(recursive=True))
    assert len(stage_procs) >= 3, "agent + two ranks"
    os.kill(caller.pid, signal.SIGKILL)
    caller.wait()
    _, alive = psutil.wait_procs(stage_procs, timeout=60)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
