"""The typed task contracts (flows/contracts.py): task cache keys hash them by content, equal in a
fresh process, different when an input changes; they survive Prefect's result serializer and JSON;
tasks take keyword arguments only."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.contracts import PreparedData, StageOutcome, StageSpec, TrackingSettings
from flows.tasks import input_key, train_stage
from nexus.training.config import TrainConfig

KEY_IN_A_FRESH_PROCESS = """
import json, sys
from types import SimpleNamespace
from flows.contracts import StageSpec
from flows.tasks import input_key, train_stage
from nexus.training.config import TrainConfig
fields = json.loads(sys.argv[1])
spec = StageSpec(**{**fields, "train": TrainConfig(**fields["train"])})
print(input_key(SimpleNamespace(task=train_stage), {"spec": spec, "torch_threads": 1}))
"""


def _spec(tmp_path: Path, **changes) -> StageSpec:
    init = tmp_path / "init"
    init.mkdir(exist_ok=True)
    if not (init / "model.safetensors").exists():
        (init / "model.safetensors").write_bytes(b"weights v1")
    fields = dict(
        stage="expert",
        name="lore",
        train=TrainConfig(max_steps=4, batch_size=4),
        data_dir=str(tmp_path / "data"),
        weights={"lore": 1.0},
        out_dir=str(tmp_path / "experts" / "lore"),
        data_fp="fp-lore",
        init_checkpoint=str(init),
        val_domains=["lore"],
        metadata={"seed_checkpoint": str(init)},
    )
    return StageSpec(**{**fields, **changes})


def _key(spec: StageSpec, **params) -> str:
    return input_key(SimpleNamespace(task=train_stage), {"spec": spec, "torch_threads": 1, **params})


def test_cache_key_is_the_same_in_a_fresh_process(tmp_path):
    spec = _spec(tmp_path)
    fields = json.dumps(dataclasses.asdict(spec))
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", KEY_IN_A_FRESH_PROCESS, fields], capture_output=True, text=True, env=env
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == _key(spec)


def test_cache_key_follows_the_inputs_not_the_bookkeeping(tmp_path):
    spec = _spec(tmp_path)
    key = _key(spec)
    assert _key(dataclasses.replace(spec, weights={"lore": 0.5, "dictionary": 0.5})) != key
    assert _key(dataclasses.replace(spec, train=TrainConfig(max_steps=5, batch_size=4))) != key
    assert _key(spec, torch_threads=2) != key
    tracking = TrackingSettings(uri="sqlite:///x.db", parent_run_id="abc", register={"lore": "m"})
    assert _key(spec, tracking=tracking, placement={"stages_per_gpu": 2}) == key

    # the stage's own output appearing does not change its key (out_dir is keyed as a path) ...
    out = Path(spec.out_dir)
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"trained")
    assert _key(spec) == key
    # ... but its input checkpoint is keyed by content: other weights at the same path, another key
    (Path(spec.init_checkpoint) / "model.safetensors").write_bytes(b"weights v2")
    assert _key(spec) != key


def test_contracts_survive_prefect_results_and_json(tmp_path):
    from prefect.serializers import PickleSerializer

    outcome = StageOutcome(
        checkpoint=str(tmp_path / "model"),
        metrics={"val/loss": 1.5},
        global_step=4,
        resumed_from_step=None,
        run_id="r1",
        registered={"name": "m", "version": "2"},
        started=1.0,
        finished=2.0,
        pid=7,
    )
    data = PreparedData(
        dir=str(tmp_path),
        seq_len=32,
        vocab_size=300,
        tokenizer="tok.json",
        fingerprints={"a": "1", "b": "2"},
        token_counts={"a": 100, "b": 300},
        config={"mixture": {}, "embedding": {"batch_size": 8}},
    )
    serializer = PickleSerializer()
    for value in (outcome, data, _spec(tmp_path)):
        assert serializer.loads(serializer.dumps(value)) == value
        json.dumps(dataclasses.asdict(value), default=str)
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.checkpoint = "elsewhere"


def test_prepared_data_mixes_as_the_library_does():
    from nexus.data import MixtureConfig, stage_weights

    data = PreparedData(
        dir="d",
        seq_len=32,
        vocab_size=300,
        tokenizer="t",
        fingerprints={"a": "1", "b": "2", "c": "3"},
        token_counts={"a": 100, "b": 300, "c": 600},
        config={"mixture": {"weighting": "uniform", "general_share": 0.25}},
    )
    cfg = MixtureConfig(weighting="uniform", general_share=0.25)
    assert data.weights("moe") == stage_weights("moe", data.token_counts, ["a", "b", "c"], cfg)
    assert data.weights("seed", ["a", "b"]) == stage_weights("seed", data.token_counts, ["a", "b"], cfg)
    assert data.weights("expert", domain="c") == {"c": 1.0}
    assert data.fingerprint({"a": 0.5, "b": 0.5}) != data.fingerprint({"a": 0.5, "c": 0.5})


def test_tasks_take_keyword_arguments_only(tmp_path):
    with pytest.raises(TypeError):
        train_stage.fn(_spec(tmp_path))
