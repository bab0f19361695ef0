"""Two micro pipelines at once against one SQLite MLflow store, one output root (distinct run
directories, one shared data cache) and one Prefect server: both complete, and each run's MLflow
records and artifacts are intact and its own (the store exists beforehand: creating a fresh SQLite store
from two processes at once races on MLflow's schema migration, see docs/reliability.md).
Plus: a stage that crashes ends its MLflow runs FAILED."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.tracking import configure as configure_tracking

from .conftest import final_digest, finish, start, start_cli, temp_leftovers

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
    MlflowClient(uri).create_experiment(
        "nexus-micro", artifact_location=(root / "mlartifacts" / "nexus_micro").as_uri()
    )
    procs = {
        name: start(
            root / name,
            *EXTRA,
            *seed,
            prefect_home=tmp_path / f"prefect-{name}",
            uri=uri,
            cache_dir=root / "cache",
            api_url=api_url,
            log=tmp_path / f"{name}.log",
        )
        for name, seed in {"a": (), "b": ("train.expert.seed=1",)}.items()
    }
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
        (output,) = moe.outputs.model_outputs  # the run's MLflow model holds the checkpoint
        location = client.get_logged_model(output.model_id).artifact_location
        local = Path(
            mlflow.artifacts.download_artifacts(
                f"{location}/artifacts/checkpoint/model.safetensors", dst_path=str(tmp_path / f"dl-{name}")
            )
        )
        assert sha256_file(local) == moe.data.tags["nexus.checkpoint_sha256"] == digests[name]
    assert len(artifact_uris) == sum(1 + len(_runs_of(client, p)) for p in parents.values())
    versions = client.search_model_versions("name = 'nexus-micro-moe'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {
        next(r.info.run_id for r in _runs_of(client, p) if r.data.tags.get("nexus.stage") == "moe")
        for p in parents.values()
    }
    assert temp_leftovers(root) == []


def test_two_extensions_of_one_model_line_at_once(tmp_path, api_url):
    """Two `nexus run extend` processes on the same line (the inbox schedule firing while someone extends
    by hand): the model-line lock makes the second build on what the first left as champion, both
    register distinct versions, and each summary names the base it was really built on."""
    import mlflow

    from flows.models import CHAMPION, TAG_BASE, line_aliases, resolve_model
    from flows.pipeline import upcycle_pipeline
    from nexus.checkpoint import read_checkpoint_config

    from ..flows.conftest import domain_folder
    from .conftest import overrides

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    args = overrides(out, *EXTRA, uri=uri)
    previous = mlflow.get_tracking_uri()
    try:
        upcycle_pipeline("micro", args)
    finally:
        configure_tracking(previous)
    procs = {
        d: start_cli(
            [
                "run",
                "extend",
                "--experiment",
                "micro",
                "--domain",
                d,
                "--folder",
                str(domain_folder(tmp_path / "inputs" / d, corpus)),
                *args,
            ],
            prefect_home=tmp_path / f"prefect-{d}",
            log=tmp_path / f"{d}.log",
            api_url=api_url,
        )
        for d, corpus in {"kernel": "kernel-docs", "pydocs": "python-docs"}.items()
    }
    logs = {d: finish(p, timeout=400) for d, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {d: log[-3000:] for d, log in logs.items()}

    summaries = {d: json.loads((out / "extensions" / d / "summary.json").read_text()) for d in procs}
    client = MlflowClient(uri)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'nexus-micro-moe'")}
    mine = {d: s["registered_version"] for d, s in summaries.items()}
    assert sorted(mine.values()) == ["2", "3"] and sorted(versions) == ["1", "2", "3"]
    first, second = sorted(summaries.values(), key=lambda s: int(s["registered_version"]))
    assert first["base"]["version"] == "1"
    # the second waited for the line, then built on the champion the first left behind
    assert second["line"]["waited_seconds"] > 0
    assert second["base"]["version"] == (first["registered_version"] if first["line"]["promoted"] else "1")
    for s in summaries.values():  # truthful: the named base has exactly the weights the run started from
        named = resolve_model(f"models:/nexus-micro-moe/{s['base']['version']}", "nexus-micro-moe", uri)
        assert (
            named.sha256
            == s["base"]["sha256"]
            == read_checkpoint_config(s["moe"])["sha256"]["model.safetensors"]
        )
        assert (
            versions[s["registered_version"]].tags[TAG_BASE]
            == f"models:/nexus-micro-moe/{s['base']['version']}"
        )
        assert s["line"]["siblings"] == []  # no other version was built on the same base
    aliases = line_aliases("nexus-micro-moe", client)
    assert aliases["candidate"] == "3"
    assert aliases[CHAMPION] in {"1", "2", "3"} and (aliases[CHAMPION] == "3") == second["line"]["promoted"]


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
        configure_tracking(previous)


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
        configure_tracking(previous)


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
        configure_tracking(previous)
    new = [r for r in client.search_runs(exp_ids) if r.info.run_id not in failed]
    linked = {v for r in new for v in r.data.tags.values() if any(f in v for f in failed)}
    assert linked


@pytest.mark.slow
def test_sigkilled_stage_runs_do_not_stay_running(tmp_path, api_url):
    from .conftest import kill_when, run

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()
    proc = start(
        out,
        *EXTRA,
        "train.expert.max_steps=24",
        "train.expert.checkpoint_every_n_steps=4",
        prefect_home=tmp_path / "prefect",
        uri=uri,
        api_url=api_url,
    )
    assert kill_when(proc, lambda: any((out / "experts").glob("*/lightning/last.ckpt")))
    finish(proc)
    code, log = run(
        out,
        *EXTRA,
        "train.expert.max_steps=24",
        "train.expert.checkpoint_every_n_steps=4",
        prefect_home=tmp_path / "prefect",
        uri=uri,
        api_url=api_url,
    )
    assert code == 0, log[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags.get("mlflow.runName") for r in runs if r.info.status == "RUNNING"] == []
