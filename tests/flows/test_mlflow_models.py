"""MLflow-native models of the micro pipeline (real SQLite store): registered versions are pyfunc models
loadable by alias in a fresh process, every stage's model is a LoggedModel with params and metrics,
and the runs table lines up held-out perplexity per domain."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from flows.models import resolve_model
from flows.tracking import configure as configure_tracking
from nexus.checkpoint import load_checkpoint
from nexus.data import load_tokenizer
from nexus.evaluation import text_perplexity
from nexus.evaluation.generation import generate

TEXTS = ["the jargon file is a glossary of hacker slang", "dictionary: a book of words and their meanings"]
PREDICT = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/nexus-micro-moe@champion")
out = model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])}), params={"max_new_tokens": 8})
print(out.to_json(orient="records", double_precision=15))
"""


def test_a_registered_version_loads_by_alias_in_a_fresh_process_and_predicts_like_our_model(
    micro_moe, tmp_path
):
    _, uri, _, _ = micro_moe
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT, uri, json.dumps(TEXTS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    champion = resolve_model("models:/nexus-micro-moe@champion", "nexus-micro-moe", uri)
    model = load_checkpoint(champion.path).eval()
    tokenizer = load_tokenizer(f"{champion.path}/tokenizer.json")
    for row, text in zip(rows, TEXTS):
        ours = text_perplexity(model, tokenizer, [text])
        assert row["perplexity"] == pytest.approx(ours.perplexity, rel=1e-12)  # JSON keeps 15 digits
        assert row["bits_per_byte"] == pytest.approx(ours.bits_per_byte, rel=1e-12)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            continuation = generate(model, torch.tensor([ids]), 8)[0, len(ids) :].tolist()
        assert row["continuation"] == tokenizer.decode(continuation) and row["tokens"] == ours.tokens
    assert not list(tmp_path.iterdir())  # loading wrote nothing where it ran


def test_every_stage_model_is_a_logged_model_with_params_and_metrics(micro_moe):
    _, uri, _, _ = micro_moe
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("nexus-micro").experiment_id
    configure_tracking(uri)
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    by_stage: dict[str, list] = {}
    for m in models:
        by_stage.setdefault(m.tags.get("nexus.stage"), []).append(m)
    assert {"seed", "expert", "upcycle", "moe"} <= set(by_stage)
    assert all(
        m.params.get("d_model") and m.model_type == "nexus" for m in models
    )  # the architecture as params
    for m in by_stage["seed"] + by_stage["expert"] + by_stage["moe"]:  # trained, then evaluated
        keys = {metric.key for metric in m.metrics}
        assert "val/loss" in keys and {"ppl/dictionary", "ppl/lore", "bpb/lore", "ppl/mean"} <= keys, (
            m.name,
            keys,
        )
    moe = next(m for m in by_stage["moe"] if m.params.get("moe.router") == "nexus")
    version = client.get_model_version("nexus-micro-moe", "1")
    assert version.source == f"models:/{moe.model_id}"  # (the SQLite registry keeps the link in `source`)
    assert "held-out perplexity" in version.description and "dictionary" in version.description


def test_runs_table_lines_up_perplexity_per_domain(micro_moe):
    _, uri, _, summary = micro_moe
    configure_tracking(uri)
    runs = mlflow.search_runs(
        experiment_names=["nexus-micro"],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary['mlflow']['parent_run_id']}'",
    )
    stages = runs.set_index("tags.mlflow.runName")
    for name in ("seed", "dictionary", "lore", "nexus", "linear"):  # the stage runs (experts by domain)
        assert {"metrics.ppl/dictionary", "metrics.ppl/lore"} <= {
            c for c in stages.columns if stages.loc[name, c] == stages.loc[name, c]
        }, name
    assert stages.loc["nexus", "tags.mlflow.source.type"] == "JOB"
    assert stages.loc["nexus", "tags.prefect.flow_run_id"] and "system/cpu_utilization_percentage" in set(
        MlflowClient(uri).get_run(stages.loc["nexus", "run_id"]).data.metrics
    )
    parent = MlflowClient(uri).get_run(summary["mlflow"]["parent_run_id"])
    for label in ("seed", "moe-nexus", "moe-linear", "dense-merge"):
        assert (
            parent.data.metrics[f"ppl/{label}/lore"]
            == summary["perplexity"][
                label.replace("-", ":", 1) if label.startswith("moe") else label.replace("-", " ")
            ]["lore"]
        )
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "routing")}
    assert "routing/moe-nexus.json" in artifacts
    assert MlflowClient(uri).list_artifacts(parent.info.run_id, "figures")
