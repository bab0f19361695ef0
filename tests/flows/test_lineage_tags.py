"""Which run the lineage records name as a checkpoint's producer, and what `nexus.inputs` holds, exactly,
in a real SQLite MLflow store: seed -> expert -> upcycle, a decoy run logged in between, and a rerun that
logs the seed's weights again. No training: the checkpoints are tiny random models saved for real."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from flows.tracking import configure as configure_tracking
from flows.tracking import find_producing_run, pipeline_run, stage_run, walk_lineage
from nexus.checkpoint import save_checkpoint
from nexus.config import tiny
from nexus.model.transformer import Transformer


def checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(Transformer(tiny()), path)


def sha256(ckpt: Path) -> str:
    return hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def produce(parent: str, stage: str, name: str, ckpt: Path, inputs: dict[str, Path] | None = None) -> str:
    """A stage run that reads `inputs` and writes `ckpt` (a logged model without files); its id."""
    with stage_run(stage, parent_run_id=parent, input_checkpoints=inputs, run_name=name) as run:
        run.log_checkpoint(ckpt, upload=False)
    time.sleep(0.01)  # distinct start times: "the most recent run" is well defined
    return run.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """seed -> expert (init: seed); a decoy expert; upcycle (seed + expert); the seed's weights logged again
    by a later run; then an extension reading the seed and a checkpoint no run logged."""
    import mlflow

    tmp_path = tmp_path_factory.mktemp("lineage")
    uri, previous = f"sqlite:///{tmp_path}/mlflow.db", mlflow.get_tracking_uri()
    configure_tracking(uri)
    try:
        yield _build(tmp_path, uri)
    finally:
        configure_tracking(previous)


def _build(tmp_path: Path, uri: str):
    ckpts = {
        name: checkpoint(tmp_path / name, i) for i, name in enumerate(("seed", "expert", "decoy", "moe"))
    }
    orphan = checkpoint(tmp_path / "orphan", 9)
    runs = {}
    with pipeline_run("lineage-tags") as parent:
        runs["seed"] = produce(parent, "seed", "seed", ckpts["seed"])
        runs["expert"] = produce(parent, "expert", "expert-x", ckpts["expert"], {"init": ckpts["seed"]})
        runs["decoy"] = produce(parent, "expert", "expert-y", ckpts["decoy"], {"init": ckpts["seed"]})
        runs["upcycle"] = produce(
            parent, "upcycle", "upcycle", ckpts["moe"], {"seed": ckpts["seed"], "expert:x": ckpts["expert"]}
        )
    with pipeline_run("lineage-tags") as parent:  # a later pipeline logs the very same seed weights
        runs["seed-again"] = produce(parent, "seed", "seed", ckpts["seed"])
        with stage_run(
            "extend",
            parent_run_id=parent,
            input_checkpoints={"moe": ckpts["moe"], "seed": ckpts["seed"], "new": orphan},
            run_name="extend",
        ) as run:
            pass
        runs["extend"] = run.run_id
    return MlflowClient(uri), runs, {**ckpts, "orphan": orphan}


def _inputs_tag(client: MlflowClient, run_id: str) -> dict:
    return json.loads(client.get_run(run_id).data.tags["nexus.inputs"])


def _record(ckpt: Path, run_id: str | None) -> dict:
    return {"path": str(ckpt), "sha256": sha256(ckpt), "run_id": run_id}


def test_each_run_tags_the_sha256_of_the_weights_it_wrote(store):
    client, runs, ckpts = store
    for name, ckpt in [("seed", "seed"), ("expert", "expert"), ("decoy", "decoy"), ("upcycle", "moe")]:
        assert client.get_run(runs[name]).data.tags["nexus.checkpoint_sha256"] == sha256(ckpts[ckpt]), name
    assert len({sha256(c) for c in ckpts.values()}) == len(ckpts)  # distinct weights: no match by accident


def test_inputs_tag_names_each_role_with_its_path_digest_and_producing_run(store):
    client, runs, ckpts = store
    assert _inputs_tag(client, runs["seed"]) == {}
    assert _inputs_tag(client, runs["expert"]) == {"init": _record(ckpts["seed"], runs["seed"])}
    assert _inputs_tag(client, runs["upcycle"]) == {
        "seed": _record(ckpts["seed"], runs["seed"]),
        "expert:x": _record(ckpts["expert"], runs["expert"]),  # not the decoy logged after it
    }


def test_the_latest_run_that_logged_the_weights_is_the_producer(store):
    """After the seed's weights were logged again, the rerun is their producer; a checkpoint no run
    logged has none (and is no model input)."""
    client, runs, ckpts = store
    assert find_producing_run(ckpts["seed"], client) == runs["seed-again"]
    assert find_producing_run(ckpts["expert"], client) == runs["expert"]
    assert find_producing_run(ckpts["orphan"], client) is None
    assert _inputs_tag(client, runs["extend"]) == {
        "moe": _record(ckpts["moe"], runs["upcycle"]),
        "seed": _record(ckpts["seed"], runs["seed-again"]),
        "new": _record(ckpts["orphan"], None),
    }


def test_model_inputs_and_lineage_name_the_same_producers(store):
    """MLflow's own records agree with the tag: each model input is the logged model of a producing run,
    and `walk_lineage` follows exactly those runs."""
    client, runs, _ = store

    def producers(run_id: str) -> set[str]:
        inputs = client.get_run(run_id).inputs.model_inputs or []
        return {client.get_logged_model(i.model_id).source_run_id for i in inputs}

    assert producers(runs["seed"]) == set()
    assert producers(runs["expert"]) == {runs["seed"]}
    assert producers(runs["upcycle"]) == {runs["seed"], runs["expert"]}
    assert producers(runs["extend"]) == {runs["upcycle"], runs["seed-again"]}
    tree = walk_lineage(runs["upcycle"], client)
    assert sorted(p.run_id for p in tree.parents) == sorted([runs["seed"], runs["expert"]])
    assert [n.run_id for n in tree.walk()] == [runs["upcycle"], *[p.run_id for p in tree.parents]]
    expert = next(p for p in tree.parents if p.run_id == runs["expert"])
    assert [p.run_id for p in expert.parents] == [runs["seed"]] and expert.stage == "expert"
