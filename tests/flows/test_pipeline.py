"""`upcycle_pipeline` then `extend_with_expert` on the micro experiment through real Prefect (test
harness), real Lightning and a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.extend import extend_with_expert
from flows.tracking import configure as configure_tracking
from flows.tracking import walk_lineage
from nexus.checkpoint import read_checkpoint_config

from .conftest import registry_versions


@pytest.fixture(scope="module")
def runs(micro_moe):
    """The session's micro pipeline, then its Nexus MoE (registered version 1) extended with `code`."""
    import mlflow

    out, uri, overrides, summary = micro_moe
    previous = mlflow.get_tracking_uri()
    before = registry_versions(uri)
    try:
        extended = extend_with_expert("micro", overrides, moe="models:/nexus-micro-moe/1", domain="code")
        yield out, uri, summary, extended, before
    finally:
        configure_tracking(previous)


def test_pipeline_states_and_checkpoints(runs):
    out, _, summary, _, _ = runs
    assert set(summary["states"]) >= {
        "seed",
        "expert-dictionary",
        "expert-lore",
        "embed-lore",
        "build-nexus",
        "build-linear",
        "build-merge",
        "moe-nexus",
        "moe-linear",
        "evaluate",
    }
    assert all(s == "Completed" for s in summary["states"].values()), summary["states"]
    for name, path in summary["checkpoints"].items():
        assert (Path(path) / "model.safetensors").is_file(), name
    moe = read_checkpoint_config(summary["checkpoints"]["moe:nexus"])["model"]["moe"]
    assert moe["expert_names"] == ["dictionary", "lore"] and moe["router"] == "nexus"
    assert set(summary["perplexity"]) == set(summary["checkpoints"])
    assert summary["routing"]["moe:nexus"]["experts"] == ["dictionary", "lore"]
    assert (out / "summary.json").is_file()


def test_extension_and_mlflow_records(runs):
    _, uri, summary, extended, before = runs
    client = MlflowClient(uri)
    assert read_checkpoint_config(extended["extended"])["model"]["moe"]["expert_names"] == [
        "dictionary",
        "lore",
        "code",
    ]
    assert set(extended["perplexity"]) == {
        "before",
        "expert:code",
        "appended",
        "after",
    }  # appended: no finetune
    assert "code" in extended["perplexity"]["after"]
    assert extended["routing"]["appended"]["experts"] == ["dictionary", "lore", "code"]
    versions = client.search_model_versions("name = 'nexus-micro-moe'")
    assert before[0] == 1 and extended["moe_version"] == "1"
    new = max(before) + 1  # the session's MoE is shared (test_inbox may extend it too)
    assert new in {int(v.version) for v in versions} and extended["registered_version"] == str(new)
    # lineage: extended MoE -> (MoE -> experts -> seed) and the code expert -> seed
    ext_run = next(v for v in versions if str(v.version) == str(new)).run_id
    stages = [n.stage for n in walk_lineage(ext_run, client).walk()]
    assert stages[0] == "extension" and {"extend", "moe", "upcycle", "expert", "seed"} <= set(stages)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "summary.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_report_has_tables_and_figures_and_is_logged(runs):
    out, uri, summary, extended, _ = runs
    from flows.report import write_pipeline_report

    paths = write_pipeline_report(summary, extended)
    markdown = paths["markdown"].read_text()
    assert "moe:nexus" in markdown and "moe:linear" in markdown and "dictionary" in markdown
    assert "Extension" in markdown and "expert:code" in markdown
    figures = sorted(p.name for p in (out / "report" / "figures").glob("*.png"))
    assert (
        "routing_moe-nexus_top1_share.png" in figures
        and "routing_moe-nexus-code_top1_share.png" in figures
        and "embeddings_moe-nexus.png" in figures
    )
    assert all((out / "report" / "figures" / f).stat().st_size > 10_000 for f in figures)
    logged = [a.path for a in MlflowClient(uri).list_artifacts(summary["mlflow"]["parent_run_id"], "report")]
    assert "report/report.md" in logged or any(p.endswith(".md") for p in logged), logged


def test_every_final_model_is_registered(runs):
    _, uri, _, _, _ = runs
    names = {m.name for m in MlflowClient(uri).search_registered_models()}
    assert {
        "nexus-micro-moe",
        "nexus-micro-moe-linear",
        "nexus-micro-seed",
        "nexus-micro-merged",
        "nexus-micro-expert-dictionary",
        "nexus-micro-expert-lore",
        "nexus-micro-expert-code",
    } <= names, names


def test_native_lineage_leads_from_the_extended_moe_to_the_seed(runs):
    """MLflow's own records only (registered version -> logged model -> producing run -> its model inputs
    -> ...): the extended MoE goes back through the MoE, the upcycling and the experts to the seed."""
    _, uri, _, extended, _ = runs
    client = MlflowClient(uri)
    start = client.get_model_version("nexus-micro-moe", extended["registered_version"]).source.removeprefix(
        "models:/"
    )
    stages, names, frontier, seen = [], set(), [start], set()
    while frontier:
        model = client.get_logged_model(frontier.pop())
        if model.model_id in seen:
            continue
        seen.add(model.model_id)
        run = client.get_run(model.source_run_id)
        stages.append(run.data.tags["nexus.stage"])
        names.add(run.info.run_name)
        frontier += [i.model_id for i in run.inputs.model_inputs]
    assert stages[0] == "extension"
    assert {"extend", "moe", "upcycle", "expert", "seed"} <= set(stages)
    assert {"dictionary", "lore", "code", "seed"} <= names  # the experts (initial and new) and the seed
