"""Two micro pipelines at once against one SQLite MLflow store, one output root (distinct run
directories, one shared data cache) and one Prefect server: both complete, and each run's MLflow
records and artifacts are intact and its own (the store exists beforehand: creating a fresh SQLite store
from two processes at once races on MLflow's schema migration, see docs/reliability.md). Plus: a stage that crashes ends its MLflow runs FAILED."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import final_digest, finish, start, temp_leftovers

EXTRA = ("router.routers=[nexus]", "router.dense_merge=false")


def _runs_of(client: MlflowClient, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_two_pipelines_share_store_and_root(tmp_path, api_url):
    from nexus.checkpoint import sha256_file

    root = tmp_path / "root"
    uri = f"sqlite:///{root}/mlflow.db"
    root.mkdir()
    # The store and the experiment are created once up front: two processes migrating a *fresh* SQLite
    # store race (`duplicate column name: step`), and two creating the experiment race in
    # get_or_create_experiment (test_experiment_creation_race below); see docs/reliability.md.
    MlflowClient(uri).create_experiment("nexus-micro", artifact_location=(root / "mlartifacts" / "nexus_micro").as_uri())
    procs = {name: start(root / name, *EXTRA, *seed, prefect_home=tmp_path / f"prefect-{name}", uri=uri,
                         cache_dir=root / "cache", api_url=api_url, log=tmp_path / f"{name}.log")
             for name, seed in {"a": (), "b": ("train.expert.seed=1",)}.items()}
    logs = {name: finish(p, timeout=400) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, logs[name][-3000:]

    summaries = {n: json.loads((root / n / "summary.json").read_text()) for n in procs}
    digests = {n: final_digest(root / n) for n in procs}
    assert digests["a"] != digests["b"]  # different expert seeds: the runs did not share outputs
    parents = {n: s["mlflow"]["parent_run_id"] for n, s in summaries.items()}
    assert parents["a"] != parents["b"]
    client = MlflowClient(uri)
    artifact_uris = set()
    for name, parent in parents.items():
        run = client.get_run(parent)
        assert run.info.status == "FINISHED"
        assert "summary.json" in [a.path for a in client.list_artifacts(parent)]
        stages = _runs_of(client, parent)
        assert stages and all(r.info.status == "FINISHED" for r in stages)
        artifact_uris |= {r.info.artifact_uri for r in [run, *stages]}
        moe = next(r for r in stages if r.data.tags.get("nexus.stage") == "moe")
        local = Path(client.download_artifacts(moe.info.run_id, "checkpoint/model.safetensors",
                                               str(tmp_path / f"dl-{name}")))
        assert sha256_file(local) == moe.data.tags["nexus.checkpoint_sha256"] == digests[name]
    assert len(artifact_uris) == sum(1 + len(_runs_of(client, p)) for p in parents.values())
    versions = client.search_model_versions("name = 'nexus-micro-moe'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {next(r.info.run_id for r in _runs_of(client, p)
                                                 if r.data.tags.get("nexus.stage") == "moe") for p in parents.values()}
    assert temp_leftovers(root) == []


def test_experiment_creation_race(tmp_path, monkeypatch):
    """Replays the interleaving: this process looks the experiment up (absent), the other process
    creates it, this process creates it."""
    import mlflow

    from flows import tracking

    previous = mlflow.get_tracking_uri()
    try:
        tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
        other = MlflowClient().create_experiment("nexus-race")
        real, calls = MlflowClient.get_experiment_by_name, []

        def absent_at_first_look(self, name):  # the other process creates it right after our look-up
            calls.append(name)
            return None if len(calls) == 1 else real(self, name)

        monkeypatch.setattr(MlflowClient, "get_experiment_by_name", absent_at_first_look)
        assert tracking.get_or_create_experiment("nexus-race") == other and len(calls) == 2
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def crashed(prefect_harness, tmp_path):
    """A tracked pipeline whose expert stages crash inside Lightning (an accelerator no Trainer knows)."""
    import mlflow

    from flows.pipeline import upcycle_pipeline
    from nexus.errors import NexusError

    from .conftest import overrides

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    args = overrides(tmp_path / "out", *EXTRA, "train.expert.accelerator=no_such_accelerator", uri=uri)
    try:
        with pytest.raises((NexusError, ValueError, RuntimeError)):
            upcycle_pipeline("micro", args)
        yield MlflowClient(uri), args
    finally:
        mlflow.set_tracking_uri(previous)


def test_crashed_stage_runs_end_failed(crashed):
    client, _ = crashed
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = {r.data.tags.get("nexus.stage"): r.info.status for r in runs}
    assert status["pipeline"] == "FAILED" and status["expert"] == "FAILED", status
    assert all(r.info.status != "RUNNING" for r in runs)


def test_rerun_links_to_failed_attempt(crashed):
    import mlflow

    from flows.pipeline import upcycle_pipeline

    client, args = crashed
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    failed = {r.info.run_id for r in client.search_runs(exp_ids) if r.info.status == "FAILED"}
    previous = mlflow.get_tracking_uri()
    try:
        upcycle_pipeline("micro", [a for a in args if not a.startswith("train.expert.accelerator=")])
    finally:
        mlflow.set_tracking_uri(previous)
    new = [r for r in client.search_runs(exp_ids) if r.info.run_id not in failed]
    linked = {v for r in new for v in r.data.tags.values() if any(f in v for f in failed)}
    assert linked


@pytest.mark.slow
def test_sigkilled_stage_runs_do_not_stay_running(tmp_path, api_url):
    from .conftest import kill_when, run

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()
    proc = start(out, *EXTRA, "train.expert.max_steps=24", "train.expert.checkpoint_every_n_steps=4",
                 prefect_home=tmp_path / "prefect", uri=uri, api_url=api_url)
    assert kill_when(proc, lambda: any((out / "experts").glob("*/lightning/last.ckpt")))
    finish(proc)
    code, log = run(out, *EXTRA, "train.expert.max_steps=24", "train.expert.checkpoint_every_n_steps=4",
                    prefect_home=tmp_path / "prefect", uri=uri, api_url=api_url)
    assert code == 0, log[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags.get("mlflow.runName") for r in runs if r.info.status == "RUNNING"] == []
