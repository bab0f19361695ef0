"""The micro pipeline with two-rank DDP stages (seed, experts, MoE) on CPU/gloo, on the threads and
the Dask runner: one flow run, one MLflow run per stage, the right number of steps, weights equal to
one process training on the same global batch, no process left behind, and a rerun all `Cached`.
All three are slow-marked (the CI budget): the lightest runs a two-rank seed only (one torchrun, the
rest in process; 75-100 s on a loaded 2-core machine), the others make every training stage two-rank,
on both runners (4-6 minutes each). The default suite covers the stage processes with
tests/training/test_launch.py (two-rank FSDP stage equal to one process, no leak, no process left).

Before stages ran as their own processes, Lightning re-executed `sys.argv` for rank 1: a second
pipeline (a second flow run and MLflow pipeline run) started, and with Dask the experts inherited
`MASTER_PORT` and died with EADDRINUSE."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import psutil
import pytest
from mlflow import MlflowClient

from flows.config import compose
from flows.contracts import StageSpec
from flows.pipeline import upcycle_pipeline
from flows.tasks import train_stage
from flows.tracking import configure as configure_tracking
from nexus.checkpoint import load_checkpoint, read_checkpoint_config
from nexus.data import MixtureConfig, stage_weights
from nexus.training.launch import DISTRIBUTED_ENV

from .conftest import micro_out, micro_overrides, micro_uri

ALL_STAGES = ("seed", "expert", "moe")


def two_ranks(*stages: str) -> list[str]:
    return [
        f"train.{stage}.{key}={value}"
        for stage in stages
        for key, value in (("strategy", "ddp"), ("devices", 2))
    ]


STAGES = [
    "seed",
    "expert-dictionary",
    "expert-lore",
    "embed-dictionary",
    "embed-lore",
    "build-nexus",
    "moe-nexus",
    "build-linear",
    "moe-linear",
    "evaluate",
]


def _flow_runs_of(out_dir) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    return sum(
        1
        for r in runs
        if r.name and str(out_dir) in json.dumps(r.parameters, default=str) and "overrides" in r.parameters
    )


HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
"""Python's per-process multiprocessing helpers (started once by Dask's LocalCluster, they live as
long as this process): not stage processes."""


def _descendants() -> set[int]:
    alive = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if not any(h in " ".join(p.cmdline()) for h in HELPERS):
                alive.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _settled(before: set[int], timeout_s: float = 30) -> set[int]:
    """Processes started since `before` still alive after `timeout_s` (a Dask cluster takes a moment)."""
    deadline = time.time() + timeout_s
    while (left := _descendants() - before) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.parametrize(
    ("runner", "stages"),
    [
        pytest.param("threads", ("seed",), marks=pytest.mark.slow),
        pytest.param("threads", ALL_STAGES, marks=[pytest.mark.slow, pytest.mark.timeout(1200)]),
        pytest.param("dask", ALL_STAGES, marks=[pytest.mark.slow, pytest.mark.timeout(1200)]),
    ],
)
def test_micro_pipeline_with_two_rank_stages(prefect_harness, tmp_path, runner, stages):
    import mlflow

    uri, out = micro_uri(tmp_path), micro_out(tmp_path)
    # runner.gpus = the MoEs' devices: placement as on a machine with that many GPUs (the stages still
    # train on the CPU here), so the two MoEs, which would share those GPUs, must train one after the
    # other (in process, 60 steps: long enough that two MoEs started together overlap whatever the
    # scheduling jitter; as two-rank stages their process start alone takes longer)
    overrides = micro_overrides(
        tmp_path,
        "router.routers=[nexus,linear]",
        "router.dense_merge=false",
        f"runner.kind={runner}",
        f"runner.gpus={2 if 'moe' in stages else 1}",  # on Dask a two-rank stage asks for two GPUs
        *([] if "moe" in stages else ["train.moe.max_steps=60", "train.moe.val_every_n_steps=60"]),
        *two_ranks(*stages),
        tracking=True,
    )
    previous = mlflow.get_tracking_uri()
    before = _descendants()
    try:
        first = upcycle_pipeline("micro", overrides)
        assert all(first["states"][k] == "Completed" for k in STAGES), first["states"]
        assert not _settled(before), "a stage or worker process outlived the pipeline"
        assert not set(DISTRIBUTED_ENV) & set(os.environ)
        assert _flow_runs_of(tmp_path) == 1, "the pipeline ran more than once (a rank re-ran the CLI/flow?)"

        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        names = sorted(r.data.tags.get("mlflow.runName") for r in runs)
        expected = [
            "upcycle_pipeline",
            "seed",
            "dictionary",
            "lore",
            "build-nexus",
            "nexus",
            "build-linear",
            "linear",
        ]
        assert names == sorted(expected), names
        assert all(r.info.status == "FINISHED" for r in runs)
        nexus_run, linear_run = (
            next(r for r in runs if r.data.tags.get("mlflow.runName") == name) for name in ("nexus", "linear")
        )
        assert linear_run.info.start_time >= nexus_run.info.end_time, "MoEs sharing a GPU trained at once"
        seed_run = next(r for r in runs if r.data.tags.get("mlflow.runName") == "seed")
        assert "train/loss" in seed_run.data.metrics  # logged live by the stage's rank 0 into its run
        # every stage's checkpoint is its run's MLflow model (output), read by the next stage (input)
        experiments = [e.experiment_id for e in client.search_experiments()]
        models = {m.source_run_id: m for m in client.search_logged_models(experiments)}
        staged = [r for r in runs if r.data.tags.get("mlflow.runName") != "upcycle_pipeline"]
        assert all(r.info.run_id in models for r in staged), "a stage without its logged model"
        assert models[seed_run.info.run_id].metrics, "the seed's logged model has no metrics"
        expert_run = next(r for r in runs if r.data.tags.get("mlflow.runName") == "lore")
        inputs = client.get_run(expert_run.info.run_id).inputs.model_inputs  # (search_runs leaves them out)
        assert [i.model_id for i in inputs] == [models[seed_run.info.run_id].model_id]

        cfg = compose("micro", overrides)
        for stage, key in (("seed", "seed"), ("expert", "expert:lore"), ("moe", "moe:nexus")):
            meta = read_checkpoint_config(first["checkpoints"][key])["metadata"]
            assert meta["global_step"] == getattr(cfg.train, stage).max_steps, (key, meta)
            assert meta["parallel"]["world_size"] == (2 if stage in stages else 1), (key, meta)

        # the two-rank seed equals one process training on the same global batch (2 x 4 sequences)
        data = json.loads((out / "data" / "main" / "manifest.json").read_text())
        weights = stage_weights(
            "seed",
            {d: v["splits"]["train"]["tokens"] for d, v in data["domains"].items()},
            list(cfg.data.seed_domains or data["domains"]),
            MixtureConfig(),
        )
        spec = StageSpec(
            stage="seed",
            name="seed",
            train=dataclasses.replace(cfg.train.seed, devices=1, strategy="auto", batch_size=8),
            data_dir=str(out / "data" / "main"),
            weights=weights,
            out_dir=str(tmp_path / "single-seed"),
            data_fp="unused",
            model=read_checkpoint_config(first["checkpoints"]["seed"])["model"],
            val_domains=list(weights),
        )
        single = train_stage.fn(spec=spec, torch_threads=1)
        a = load_checkpoint(first["checkpoints"]["seed"]).state_dict()
        b = load_checkpoint(single.checkpoint).state_dict()
        difference = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{runner}: seed, two ranks vs one process: max weight difference {difference:.2e}")
        assert difference < 1e-4

        again = upcycle_pipeline("micro", overrides)
        assert all(again["states"][k] == "Cached" for k in STAGES), again["states"]
        assert again["perplexity"] == first["perplexity"]
        assert not _settled(before)
    finally:
        configure_tracking(previous)
