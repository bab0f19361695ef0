"""MLflow tracking end to end: a tiny seed -> experts -> upcycle -> MoE pipeline through the real
Lightning Trainer into a real SQLite store, then runs, metrics, artifacts, registry and lineage."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from flows.tracking import (
    configure,
    find_producing_run,
    flatten,
    pipeline_run,
    resolved,
    stage_run,
    walk_lineage,
)
from flows.tracking import configure as configure_tracking
from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import tiny
from nexus.training import MixtureDataModule, TrainConfig, train_dense, train_moe
from nexus.training.synthetic import synthetic_splits
from nexus.upcycling import upcycle

DOMAINS = ["a", "b"]
CFG = TrainConfig(
    max_steps=4,
    batch_size=4,
    val_every_n_steps=2,
    limit_val_batches=1,
    log_every_n_steps=1,
    checkpoint_every_n_steps=2,
    progress_bar=False,
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the pipeline once; restore the tracking URI afterwards."""
    root = tmp_path_factory.mktemp("pipeline")
    previous = mlflow.get_tracking_uri()
    configure(f"sqlite:///{root}/mlflow.db")
    out, data_dir = root / "out", root / "data"
    train, val = synthetic_splits(DOMAINS, seq_len=16, vocab_size=96, n_train=32, n_val=4)

    def data(weights):
        return MixtureDataModule(train, val, weights, CFG.batch_size, CFG.max_steps)

    runs, results, fingerprints = {}, {}, {}
    try:
        with pipeline_run(f"nexus-test-{uuid.uuid4().hex[:8]}", config={"experiment": "tiny"}) as pid:

            def stage(name, stage_kind, weights, register_as, train_fn, inputs=None, **kwargs):
                config = {"train": CFG, "data": {"weights": weights}, "api_key": "hunter2"}
                with stage_run(
                    stage_kind, config, parent_run_id=pid, input_checkpoints=inputs, run_name=name
                ) as run:
                    dm = data(weights)
                    run.log_data_module(dm, source=str(data_dir))
                    result = train_fn(CFG, dm, out / name, loggers=[run.logger()], **kwargs)
                    run.log_result(result, register_as=register_as)
                runs[name], results[name], fingerprints[name] = run.run_id, result, dm.fingerprint

            stage(
                "seed", "seed", {"a": 1, "b": 1}, "nexus-seed", train_dense, model_config=tiny(max_seq_len=16)
            )
            for d in DOMAINS:
                stage(
                    f"expert-{d}",
                    "expert",
                    {d: 1.0},
                    f"nexus-expert-{d}",
                    train_dense,
                    inputs={"seed": results["seed"].checkpoint},
                    init_checkpoint=results["seed"].checkpoint,
                )

            ckpts = {
                "seed": results["seed"].checkpoint,
                **{f"expert:{d}": results[f"expert-{d}"].checkpoint for d in DOMAINS},
            }
            with stage_run("upcycle", {"router": "nexus"}, parent_run_id=pid, input_checkpoints=ckpts) as run:
                emb = torch.randn(len(DOMAINS), 384)
                save_file({"domain_embeddings": emb}, str(root / "domain_embeddings.safetensors"))
                moe = upcycle(
                    load_checkpoint(ckpts["seed"]),
                    [load_checkpoint(results[f"expert-{d}"].checkpoint) for d in DOMAINS],
                    emb,
                    "nexus",
                    DOMAINS,
                )
                save_checkpoint(moe, out / "upcycled")
                run.log_checkpoint(out / "upcycled")
                run.log_artifacts(root / "domain_embeddings.safetensors", "domain_embeddings")
            runs["upcycle"] = run.run_id
            stage(
                "moe",
                "moe",
                {"a": 1, "b": 1},
                "nexus-moe",
                train_moe,
                inputs={"init": out / "upcycled"},
                init_checkpoint=out / "upcycled",
            )
        yield {
            "root": root,
            "out": out,
            "parent": pid,
            "runs": runs,
            "results": results,
            "data_fingerprints": fingerprints,
        }
    finally:
        configure_tracking(previous)


def test_runs_params_and_metrics(pipeline):
    client = MlflowClient()
    runs = {k: client.get_run(v) for k, v in pipeline["runs"].items()}
    assert client.get_run(pipeline["parent"]).info.status == "FINISHED"
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == pipeline["parent"]
        assert run.info.experiment_id == client.get_run(pipeline["parent"]).info.experiment_id
    seed = runs["seed"].data
    assert seed.params["train.lr"] == "0.001" and seed.params["train.max_steps"] == "4"
    assert seed.params["api_key"] == "***"
    for key in ("train/loss", "train/tokens_per_s", "val/loss", "val/a/loss", "val/b/loss", "val/a/ppl"):
        assert key in seed.metrics, key
    assert [m.step for m in MlflowClient().get_metric_history(runs["seed"].info.run_id, "train/loss")] == [
        0,
        1,
        2,
        3,
        4,
    ]
    moe = runs["moe"].data.metrics
    for key in (
        "train/aux_loss",
        "train/load_balance_loss",
        "val/routing/layer0/a/a",
        "val/routing/mean/b/b",
    ):
        assert key in moe, key
    for layer in range(2):
        for d in DOMAINS:
            assert sum(moe[f"val/routing/layer{layer}/{d}/{e}"] for e in DOMAINS) == pytest.approx(1.0)
    assert "val/routing/layer0/a/a" not in runs["seed"].data.metrics


def test_artifacts_registry_and_checkpoint_reload(pipeline, tmp_path):
    client = MlflowClient()
    moe_run = pipeline["runs"]["moe"]
    (output,) = client.get_run(moe_run).outputs.model_outputs  # the checkpoint is the run's MLflow model
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == moe_run and model.tags["nexus.stage"] == "moe"
    names = {f.path for f in client.list_logged_model_artifacts(model.model_id, "artifacts/checkpoint")}
    assert {"artifacts/checkpoint/config.json", "artifacts/checkpoint/model.safetensors"} <= names
    assert "config.json" in {f.path for f in client.list_artifacts(moe_run)}
    assert client.list_artifacts(pipeline["runs"]["upcycle"], "domain_embeddings")
    downloaded = mlflow.artifacts.download_artifacts(
        f"{model.artifact_location}/artifacts/checkpoint", dst_path=str(tmp_path)
    )
    got, want = (
        load_checkpoint(downloaded).state_dict(),
        load_checkpoint(pipeline["results"]["moe"].checkpoint).state_dict(),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    for name in ("nexus-seed", "nexus-expert-a", "nexus-expert-b", "nexus-moe"):
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert str(version.version) == "1"
    (mv,) = client.search_model_versions("name = 'nexus-moe'")
    assert mv.run_id == moe_run
    assert find_producing_run(pipeline["results"]["moe"].checkpoint) == moe_run


def test_lineage_walks_back_to_seed_from_store_alone(pipeline):
    runs = pipeline["runs"]
    moved = pipeline["root"] / "moved-away"
    shutil.move(pipeline["out"], moved)  # no local checkpoint may be consulted
    try:
        tree = walk_lineage(runs["moe"], MlflowClient())
    finally:
        shutil.move(moved, pipeline["out"])
    assert tree.stage == "moe" and [p.run_id for p in tree.parents] == [runs["upcycle"]]
    upcycle_node = tree.parents[0]
    by_run = {p.run_id: p for p in upcycle_node.parents}  # MLflow's model inputs keep no order
    assert set(by_run) == {runs["seed"], runs["expert-a"], runs["expert-b"]}
    for expert in (by_run[runs["expert-a"]], by_run[runs["expert-b"]]):
        assert expert.stage == "expert" and [p.run_id for p in expert.parents] == [runs["seed"]]
        assert expert.parents[0] is by_run[runs["seed"]]  # one node per run
    nodes = {n.run_id: n for n in tree.walk()}
    assert set(nodes) == set(runs.values())
    seed_data = nodes[runs["seed"]].datasets
    fingerprint = pipeline["data_fingerprints"]["seed"]
    assert len(seed_data) == 1 and seed_data[0]["digest"] == fingerprint[:32]
    assert seed_data[0]["nexus.fingerprint"] == fingerprint and seed_data[0]["context"] == "train"
    expert_a = nodes[runs["expert-a"]]
    assert [(name, str(v)) for name, v in expert_a.models] == [("nexus-expert-a", "1")]
    assert '"a": 1.0' in expert_a.datasets[0]["weights"] and '"b"' not in expert_a.datasets[0]["weights"]
    assert nodes[runs["seed"]].checkpoint_sha256 and nodes[runs["seed"]].parents == []


def test_intermediate_checkpoints_at_paper_size_are_logged_models_without_files(pipeline):
    """`tracking.upload_checkpoints: final`: an intermediate stage's checkpoint (here an expert's) is
    still its run's logged model, with params, metrics and lineage, but its files stay out of MLflow
    and it is not registered; a final one is uploaded and registered as with `all`."""
    from flows.contracts import TrackingSettings
    from flows.tasks import record_checkpoint, record_result

    client = MlflowClient()
    final_mode = TrackingSettings(uri=None, parent_run_id=pipeline["parent"], upload_checkpoints="final")
    expert = pipeline["results"]["expert-a"]
    with stage_run("expert", {"x": 1}, parent_run_id=pipeline["parent"], run_name="a-paper-size") as run:
        assert record_result(run, expert, False, final_mode, register_as="nexus-never-registered") is None
    (output,) = client.get_run(run.run_id).outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.params["d_model"] == "32" and "train/loss" in {m.key for m in model.metrics}
    assert model.tags["nexus.checkpoint_uploaded"] == "false"
    assert model.tags["nexus.checkpoint_path"] == str(Path(expert.checkpoint).resolve())
    assert client.list_logged_model_artifacts(model.model_id) == []
    assert not client.search_registered_models("name = 'nexus-never-registered'")
    with stage_run(
        "upcycle",
        {"x": 1},
        parent_run_id=pipeline["parent"],
        input_checkpoints={"expert:a": expert.checkpoint},
    ) as reader:
        version = record_checkpoint(reader, pipeline["out"] / "upcycled", True, final_mode, "nexus-final-one")
    assert [p.run_id for p in walk_lineage(reader.run_id).parents] == [
        run.run_id
    ]  # lineage without the files
    assert version is not None and client.list_logged_model_artifacts(reader.model_id)
    with pytest.raises(ValueError, match="carries its checkpoint"):
        run.log_checkpoint(expert.checkpoint, register_as="nexus-never-registered", upload=False)


def test_failed_stage_run_is_marked_failed(pipeline):
    with (
        pytest.raises(RuntimeError, match="boom"),
        pipeline_run(f"failing-{uuid.uuid4().hex[:8]}") as pid,
        stage_run("seed", {"x": 1}, parent_run_id=pid) as run,
    ):
        raise RuntimeError("boom")
    client = MlflowClient()
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(pid).info.status == "FAILED"


def test_resolved_config_redacts_credentials_and_flattens():
    config = {
        "db": {"password": "x", "host": "h"},
        "hf_token": "t",
        "author": "me",
        "tokenizer": {"vocab_size": 8},
        "p": Path("/a"),
    }
    assert flatten(resolved(config)) == {
        "db.password": "***",
        "db.host": "h",
        "hf_token": "***",
        "author": "me",
        "tokenizer.vocab_size": 8,
        "p": "/a",
    }
