"""`nexus eval`: model references resolved in a real SQLite MLflow store, lm-eval on the registered
micro MoE with its experiment's held-out suite, results logged to MLflow with lineage, and the
same byte perplexity from its transformers export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from flows.lm_evaluation import resolve_model
from nexus.checkpoint import read_checkpoint_config, save_checkpoint
from nexus.config import tiny
from nexus.errors import ConfigError
from nexus.model.transformer import Transformer


def _register(name: str, checkpoint: Path) -> str:
    from flows.tracking import pipeline_run, stage_run

    with pipeline_run("registry-test") as parent, stage_run("moe", parent_run_id=parent) as run:
        return str(run.log_checkpoint(checkpoint, register_as=name).version)


def test_model_references_resolve_in_a_real_store(tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    first = save_checkpoint(Transformer(tiny()), tmp_path / "v1")
    second = save_checkpoint(Transformer(tiny(n_layers=1)), tmp_path / "v2")
    assert (_register("nexus-test-moe", first), _register("nexus-test-moe", second)) == ("1", "2")
    MlflowClient().set_registered_model_alias("nexus-test-moe", "champion", "1")

    def sha(path):
        return read_checkpoint_config(path)["sha256"]

    for ref, version, source in (
        ("models:/nexus-test-moe@champion", "1", first),
        ("models:/nexus-test-moe/2", "2", second),
        ("models:/nexus-test-moe", "1", first),  # a bare name is its @champion
        ("nexus-test-moe", "1", first),
    ):
        model = resolve_model(ref, tmp_path / "dl", mlflow_uri)
        assert (model.name, model.version) == ("nexus-test-moe", version)
        assert sha(model.path) == sha(source)  # local artifacts are used in place, remote ones fetched
    assert resolve_model(str(first), tmp_path / "dl").path == str(first.resolve())
    for ref, words in (
        ("models:/nexus-test-moe@nope", "nexus-test-moe@nope"),
        ("models:/other/1", "other/1"),
        ("models:/other", "no registered model 'other'"),
        ("no/such/dir", "no/such/dir.*does not exist"),
    ):
        with pytest.raises(ConfigError, match=words):
            resolve_model(ref, tmp_path / "dl", mlflow_uri)


@pytest.mark.usefixtures("one_thread")
def test_nexus_eval_on_the_registered_micro_moe_and_its_export(micro_moe, tmp_path, monkeypatch, capsys):
    """As a user would: by alias, in a fresh working directory, twice; then the export of the same
    weights through lm-eval's `hf` model gives the same byte perplexity (to 1e-6)."""
    from mlflow import MlflowClient

    from flows.tracking import walk_lineage

    _, uri, _, summary = micro_moe
    data_dir = read_checkpoint_config(summary["checkpoints"]["moe:nexus"])["metadata"]["data_dir"]
    client = MlflowClient(uri)
    client.set_registered_model_alias("nexus-micro-moe", "champion", "1")
    version = client.get_model_version("nexus-micro-moe", "1")
    monkeypatch.chdir(tmp_path)
    args = [
        "eval",
        "models:/nexus-micro-moe@champion",
        "--data",
        data_dir,
        "--domains",
        "dictionary,lore",
        "--max-documents",
        "3",
        "--tracking-uri",
        uri,
        "--batch-size",
        "4",
    ]
    run_ids = []
    for _ in range(2):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "nexus_heldout_dictionary" in out and "byte_perplexity" in out
        results = json.loads(Path("outputs/eval/nexus-micro-moe@champion/results.json").read_text())
        run_ids.append(results["nexus"]["mlflow_run_id"])
    assert run_ids[0] != run_ids[1]

    run = client.get_run(run_ids[1])
    ours = results["results"]["nexus_heldout_dictionary"]["byte_perplexity,none"]
    assert run.data.metrics["nexus_heldout_dictionary/byte_perplexity"] == pytest.approx(ours, rel=1e-12)
    assert "nexus_heldout_lore/bits_per_byte" in run.data.metrics
    assert (run.data.tags["nexus.stage"], run.data.tags["nexus.registered_version"]) == ("eval", "1")
    assert run.data.tags["nexus.parent_runs"] == version.run_id
    stages = {node.stage for node in walk_lineage(run_ids[1], client).walk()}
    assert {"eval", "moe", "upcycle", "expert", "seed"} <= stages
    assert "results.json" in [a.path for a in client.list_artifacts(run_ids[1])]

    checkpoint = results["nexus"]["model_path"]
    assert main(["export", checkpoint, "hf"]) == 0
    assert (
        main(
            [
                "eval",
                "hf",
                "--tasks",
                "nexus_heldout_dictionary",
                "--include-path",
                "outputs/eval/nexus-micro-moe@champion/tasks",
                "--no-tracking",
                "--out",
                "eval-hf",
            ]
        )
        == 0
    )
    theirs = json.loads(Path("eval-hf/results.json").read_text())
    assert theirs["nexus"]["mlflow_run_id"] is None
    assert abs(theirs["results"]["nexus_heldout_dictionary"]["byte_perplexity,none"] - ours) <= 1e-6 * ours
    assert main(["eval", "models:/nexus-micro-moe@nope", "--tasks", "x", "--tracking-uri", uri]) == 2
    assert "nexus-micro-moe@nope" in capsys.readouterr().err
