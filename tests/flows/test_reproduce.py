"""`reproduce_paper` end to end on the micro experiment (two seeds, two budgets, the ablations), with a
real Prefect flow run and a SQLite MLflow store; and the arithmetic of the results tables."""
from __future__ import annotations

import json
import math

import pytest

from flows.results import fmt, gain, mean_std
from tests.flows.conftest import micro_out, micro_overrides


def test_gain_and_spread():
    assert gain(90.0, 100.0) == pytest.approx(0.10)  # lower perplexity than the baseline: positive
    assert gain(110.0, 100.0) == pytest.approx(-0.10)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))  # sample standard deviation
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt([0.1, 0.3], 1, percent=True) == "20.0 ± 14.1 %"


@pytest.fixture(scope="module")
def reproduction(prefect_harness, tmp_path_factory):
    from flows.reproduce import reproduce_paper

    home = tmp_path_factory.mktemp("reproduce")
    overrides = micro_overrides(home, "router.continued_seed=true", tracking=True)
    return micro_out(home), reproduce_paper("micro", overrides, seeds=[0, 1], budgets=[2, 3], ablation_seeds=[1])


def test_replicates_share_the_seed_model_and_differ_after_it(reproduction):
    from nexus.checkpoint import read_checkpoint_config

    out, results = reproduction
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    runs = [results["replicates"][s]["pipeline"]["checkpoints"] for s in ("0", "1")]
    assert runs[0]["seed"] == runs[1]["seed"]
    digests = [read_checkpoint_config(r["expert:lore"])["sha256"] for r in runs]
    assert digests[0] != digests[1]  # experts, data order and routers follow the replicate seed
    assert set(runs[0]) >= {"seed continued", "dense merge", "moe:nexus", "moe:linear"}


def test_extension_at_every_budget_for_both_routers_trains_the_new_expert_once(reproduction):
    from nexus.checkpoint import read_checkpoint_config

    _, results = reproduction
    extensions = results["replicates"]["0"]["extensions"]
    assert sorted(extensions) == ["linear/2", "linear/3", "nexus/2", "nexus/3"]
    for key, ext in extensions.items():
        router, steps = key.split("/")
        info = read_checkpoint_config(ext["extended"])
        assert info["model"]["moe"]["router"] == router and info["model"]["moe"]["expert_names"][-1] == "code"
        assert ext["finetune_steps"] == int(steps)
        assert set(ext["perplexity"]) == {"before", "expert:code", "appended", "after"}
    assert sum(ext["states"]["expert"] != "Cached" for ext in extensions.values()) == 1


def test_ablations_change_only_the_moe_stage(reproduction):
    from nexus.checkpoint import read_checkpoint_config

    _, results = reproduction
    assert list(results["ablations"]) == ["1"]
    ablations = results["ablations"]["1"]
    lb = read_checkpoint_config(ablations["load-balance 0.0005"]["checkpoints"]["moe:nexus"])["model"]["moe"]
    assert lb["load_balance_coef"] == 0.0005
    default = results["replicates"]["1"]["pipeline"]["checkpoints"]["moe:nexus"]
    assert read_checkpoint_config(default)["model"]["moe"]["load_balance_coef"] == 0.05
    uniform = ablations["uniform sampling"]["perplexity"]["moe:nexus"]
    assert uniform != results["replicates"]["1"]["pipeline"]["perplexity"]["moe:nexus"]


def test_finetuning_mix_ablation_changes_only_the_extension_mix(reproduction):
    _, results = reproduction
    assert list(results["extension_ablations"]) == ["1"]
    mixes = results["extension_ablations"]["1"]
    assert set(mixes) == {"new share 0.25", "new share 0.75"}
    default = results["replicates"]["1"]["extensions"]["nexus/3"]  # the middle of budgets [2, 3]
    for mix in mixes.values():
        assert set(mix) == {"nexus", "linear"}
        assert mix["nexus"]["finetune_steps"] == 3 and mix["nexus"]["tag"] != default["tag"]
        assert mix["nexus"]["perplexity"]["appended"] == default["perplexity"]["appended"]  # same MoE + expert
        assert mix["nexus"]["perplexity"]["after"] != default["perplexity"]["after"]
    assert mixes["new share 0.25"]["nexus"]["perplexity"]["after"] != mixes["new share 0.75"]["nexus"]["perplexity"]["after"]


def test_results_document_reports_the_runs(reproduction):
    out, results = reproduction
    text = (out / "results" / "results.md").read_text()
    nexus = [sum(r["pipeline"]["perplexity"]["moe:nexus"].values()) / 2 for r in results["replicates"].values()]
    assert "| `moe:nexus` | " in text and fmt(nexus) in text
    for section in ("Relative gain", "Extension with `code`", "Routing", "Ablations", "finetuning mix"):
        assert section in text
    figures = sorted(p.name for p in (out / "results" / "figures").glob("*.png"))
    assert {"extension_curves.png", "embeddings.png", "routing_nexus_extended.png", "perplexity.png"} <= set(figures)
    assert all((out / "results" / "figures" / f).stat().st_size > 10_000 for f in figures)
    for name in figures:
        assert f"figures/{name}" in text
