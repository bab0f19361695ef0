"""`python -m flows.bam` end to end on the micro experiment, as a user runs it: a fresh working directory
(the project home), its own Prefect server and SQLite MLflow store, two seeds and the shared-attention
ablation on the second, then a rerun and a BAM MoE through `nexus run extend` and `nexus run remove`.
All slow (minutes: the default suite has the maths in tests/model/test_attention_experts.py and
extend/remove in tests/test_attention_upcycling.py), except the timing rule of the step-time ratios."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.bam import stage_timing
from flows.contracts import StageOutcome
from nexus.checkpoint import load_checkpoint, read_checkpoint_config

from .conftest import domain_folder

COMMAND = [
    sys.executable,
    "-m",
    "flows.bam",
    "--experiment",
    "micro",
    "--seeds",
    "0",
    "1",
    "--ablation-seeds",
    "1",
    "torch_threads=1",
]
ATTENTION = {
    "ffn-only": ("none", False),
    "bam-full": ("full", False),
    "bam-shared-kv": ("shared_kv", False),
    "bam-full + shared attention": ("full", True),
}


def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=home, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_only_steps_trained_by_the_task_are_timed(tmp_path):
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    written = weights.stat().st_mtime
    stage = StageOutcome(
        checkpoint=str(weights.parent),
        metrics={},
        global_step=300,
        resumed_from_step=None,
        started=written - 60.0,
        finished=written,
    )
    fresh = stage_timing(stage)
    assert fresh == {"steps": 300, "seconds_per_step": pytest.approx(60.0 / 300)}
    resumed = stage_timing(dataclasses.replace(stage, resumed_from_step=200))
    assert resumed["seconds_per_step"] == pytest.approx(60.0 / 100)
    reused = stage_timing(dataclasses.replace(stage, started=written + 1.0, finished=written + 2.0))
    assert reused == {"steps": 300, "seconds_per_step": None}  # a finished stage of an earlier run


@pytest.fixture(scope="module")
def bam_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("bam")
    run(COMMAND, home)
    return home, json.loads((home / "outputs" / "micro" / "bam.json").read_text())


@pytest.mark.slow
def test_variants_share_seed_experts_and_data_and_differ_only_in_the_attention(bam_run):
    _, results = bam_run
    seeds = []
    for seed, replicate in results["replicates"].items():
        variants = replicate["variants"]
        assert set(variants) == set(ATTENTION) - ({"bam-full + shared attention"} if seed == "0" else set())
        for name, stage in variants.items():
            for router in ("nexus", "linear"):
                info = read_checkpoint_config(stage["checkpoints"][f"moe:{router}"])
                moe = info["model"]["moe"]
                assert (moe["attention_experts"], moe["attention_shared_expert"]) == ATTENTION[name]
                assert moe["router"] == router and moe["attention_routing"] == "soft"
                assert (
                    info["metadata"]["data"]
                    == read_checkpoint_config(variants["ffn-only"]["checkpoints"][f"moe:{router}"])[
                        "metadata"
                    ]["data"]
                )  # same tokens
                seeds.append(info["metadata"]["seed_checkpoint"])
        ffn, full = variants["ffn-only"]["perplexity"], variants["bam-full"]["perplexity"]
        assert ffn["moe:nexus"] != full["moe:nexus"]
    assert len(set(seeds)) == 1  # one seed model for every replicate and variant


@pytest.mark.slow
def test_kv_cache_bytes_and_parameters_are_recorded(bam_run):
    _, results = bam_run
    facts = {
        name: stage["models"]["moe:nexus"] for name, stage in results["replicates"]["1"]["variants"].items()
    }
    dense_kv = facts["ffn-only"]["kv_bytes_per_token"]
    assert dense_kv == 2 * 2 * 4 * 8 * 4  # K and V, 2 layers, 4 heads of 8, fp32
    assert facts["bam-shared-kv"]["kv_bytes_per_token"] == dense_kv
    assert facts["bam-full"]["kv_bytes_per_token"] == 2 * dense_kv  # 2 experts
    assert facts["bam-full + shared attention"]["kv_bytes_per_token"] == 3 * dense_kv
    total = {name: f["params"]["total"] for name, f in facts.items()}
    assert (
        total["ffn-only"] < total["bam-shared-kv"] < total["bam-full"] < total["bam-full + shared attention"]
    )
    for stage in results["replicates"]["0"]["variants"].values():
        assert all(t["steps"] == 4 and t["seconds_per_step"] > 0 for t in stage["training"].values())


@pytest.mark.slow
def test_report_has_the_tables_and_figures(bam_run):
    home, _ = bam_run
    report = home / "outputs" / "micro" / "results"
    text = (report / "bam.md").read_text()
    for name in ATTENTION:
        assert f"| `{name}` | nexus |" in text and f"| `{name}` | linear |" in text
    assert "step time vs `ffn-only`" in text and "KV cache bytes/token" in text and "Nexus vs linear" in text
    assert "python " + " ".join(COMMAND[1:]) in text  # the command that regenerates it
    for figure in ("bam-perplexity.png", "bam-gain.png"):
        assert f"figures/{figure}" in text and (report / "figures" / figure).stat().st_size > 10_000


@pytest.mark.slow
def test_a_rerun_reuses_every_model_and_reports_the_same(bam_run):
    home, first = bam_run
    run(COMMAND, home)
    again = json.loads((home / "outputs" / "micro" / "bam.json").read_text())
    for seed, replicate in first["replicates"].items():
        for name, stage in replicate["variants"].items():
            other = again["replicates"][seed]["variants"][name]
            assert other["checkpoints"] == stage["checkpoints"] and other["perplexity"] == stage["perplexity"]
            assert other["training"] == stage["training"]  # cached stages: the first run's timing


@pytest.mark.slow
def test_a_bam_moe_is_extended_and_the_expert_removed_by_the_flows(bam_run, tmp_path):
    home, results = bam_run
    moe = results["replicates"]["0"]["variants"]["bam-shared-kv"]["checkpoints"]["moe:nexus"]
    folder = domain_folder(tmp_path / "code", "code")
    nexus = [sys.executable, "-m", "flows.cli", "run"]
    run(
        [
            *nexus,
            "extend",
            "--experiment",
            "micro",
            "--moe",
            moe,
            "--domain",
            "code",
            "--folder",
            str(folder),
            "torch_threads=1",
        ],
        home,
    )
    out = home / "outputs" / "micro"
    before, appended = load_checkpoint(moe), load_checkpoint(out / "extensions" / "code" / "extended")
    assert appended.config.moe.expert_names == ["dictionary", "lore", "code"]
    for key, tensor in before.state_dict().items():
        if ".attn.experts." in key:  # the old attention experts, untouched
            assert torch.equal(appended.state_dict()[key][:2], tensor), key
    run([*nexus, "remove", "--experiment", "micro", "--domain", "code"], home)
    (removed,) = (out / "removals" / "code").glob("*/model")
    config = read_checkpoint_config(removed)["model"]["moe"]
    assert config["expert_names"] == ["dictionary", "lore"] and config["attention_experts"] == "shared_kv"
