"""`reproduce_paper` end to end on the micro experiment (two seeds, two budgets, two router variants, a
recipe ablation), with a real Prefect flow run and a SQLite MLflow store; and the arithmetic of the
results tables."""

from __future__ import annotations

import json
import math

import pytest

from flows.results import divergence_summary, fmt, gain, gap_closed, initial_change, mean_std
from tests.flows.conftest import micro_out, micro_overrides


def test_gain_gap_and_spread():
    assert gain(90.0, 100.0) == pytest.approx(0.10)  # lower perplexity than the baseline: positive
    assert gain(110.0, 100.0) == pytest.approx(-0.10)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))  # sample standard deviation
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt([0.1, 0.3], 1, percent=True) == "20.0 ± 14.1 %"
    ext = {
        "domain": "new",
        "perplexity": {
            "before": {"a": 10.0, "b": 20.0, "new": 100.0},
            "expert:new": {"new": 50.0},
            "after": {"a": 10.5, "b": 20.0, "new": 60.0},
        },
    }
    assert gap_closed(ext, "after") == pytest.approx(
        0.8
    )  # 40 of the 50 points between the MoE and the expert
    assert initial_change(ext, "after", ["a", "b"]) == (pytest.approx(0.025), pytest.approx(0.05))


def test_divergence_summary_pools_the_earlier_domains_prompts():
    ext = {
        "divergence": {
            "after": {
                "a": {"first": [0, None], "share": 0.5, "new_tokens": 8},
                "b": {"first": [1, 2, 3], "share": 0.1, "new_tokens": 8},
            }
        }
    }
    mean, median, share = divergence_summary(ext, "after")
    assert mean == pytest.approx((0 + 8 + 1 + 2 + 3) / 5)  # a never-diverging prompt counts as 8
    assert median == 2.0
    assert share == pytest.approx(0.3)
    assert all(math.isnan(v) for v in divergence_summary(ext, "appended"))


@pytest.fixture(scope="module")
def reproduction(prefect_harness, tmp_path_factory):
    from flows.reproduce import reproduce_paper

    home = tmp_path_factory.mktemp("reproduce")
    overrides = micro_overrides(home, "router.continued_seed=true", tracking=True)
    results = reproduce_paper(
        "micro",
        overrides,
        seeds=[0, 1],
        budgets=[2, 3],
        ablation_seeds=[1],
        domains=["code"],
        recipes=["protect"],
        routers=["nexus", "linear-reset"],
        ablations={"λ = 0": ["extension.lam=0.0"]},
    )
    return home, micro_out(home), results


def test_replicates_share_the_cached_seed_model_and_differ_after_it(reproduction):
    from flows.reproduce import seed_model
    from nexus.checkpoint import read_checkpoint_config

    home, out, results = reproduction
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    runs = [results["replicates"][s]["pipeline"]["checkpoints"] for s in ("0", "1")]
    assert runs[0]["seed"] == runs[1]["seed"] == results["seed_model"]
    assert results["seed_model"].startswith(str(out / "seed-"))
    assert (
        seed_model("micro", micro_overrides(home, "router.continued_seed=true", tracking=True))
        == runs[0]["seed"]
    )
    digests = [read_checkpoint_config(r["expert:lore"])["sha256"] for r in runs]
    assert digests[0] != digests[1]  # experts, data order and routers follow the replicate seed
    assert set(runs[0]) >= {"seed continued", "dense merge", "moe:nexus", "moe:linear"}


def test_extension_grid_trains_the_new_expert_once_and_applies_each_variant(reproduction):
    from nexus.checkpoint import read_checkpoint_config

    _, _, results = reproduction
    extensions = results["replicates"]["0"]["extensions"]
    assert sorted(extensions) == [f"code/{v}/protect/{b}" for v in ("linear-reset", "nexus") for b in (2, 3)]
    for key, ext in extensions.items():
        _, variant, recipe, steps = key.split("/")
        info = read_checkpoint_config(ext["extended"])["model"]["moe"]
        assert info["router"] == variant.split("-")[0] and info["expert_names"][-1] == "code"
        assert ext["finetune_steps"] == int(steps) and ext["recipe"]["recipe"] == recipe
        assert ext["recipe"]["linear_router"] == ("reset" if variant == "linear-reset" else "append")
        assert set(ext["perplexity"]) == {"before", "expert:code", "appended", "after"}
        assert set(ext["divergence"]["after"]) == {"dictionary", "lore"}
    assert sum(ext["states"]["expert"] != "Cached" for ext in extensions.values()) == 1


def test_recipe_ablation_changes_only_its_factor(reproduction):
    from nexus.checkpoint import load_checkpoint

    _, _, results = reproduction
    assert list(results["recipe_ablations"]) == ["1"]
    lam0 = results["recipe_ablations"]["1"]["λ = 0"]
    assert set(lam0) == {"code/nexus", "code/linear-reset"}
    ext = lam0["code/nexus"]
    assert ext["recipe"]["recipe"] == "paper" and ext["recipe"]["lam"] == 0.0 and ext["finetune_steps"] == 2
    before, appended = (load_checkpoint(p).tok_emb.weight for p in (ext["moe"], ext["appended_checkpoint"]))
    assert before.equal(appended)  # λ = 0 keeps the MoE's embeddings


def test_results_document_reports_the_runs(reproduction):
    _, out, results = reproduction
    text = (out / "results" / "results.md").read_text()
    nexus = [
        sum(r["pipeline"]["perplexity"]["moe:nexus"].values()) / 2 for r in results["replicates"].values()
    ]
    assert "| `moe:nexus` | " in text and fmt(nexus) in text
    for section in (
        "Relative gain",
        "Extension with `code`",
        "Targets (recipe `protect`)",
        "Recipe ablations",
        "Precomputed vs live Nexus router",
        "MiniLM cosine",
        "Nexus vs the linear router",
        "| FDT mean | FDT median | divergent share |",
    ):
        assert section in text, section
    assert "0 prompts diverged" not in text or "Precomputed" in text
    figures = sorted(p.name for p in (out / "results" / "figures").glob("*.png"))
    assert {"perplexity.png", "embeddings_code.png", "routing_nexus_code_after.png"} <= set(figures)
    for name in figures:
        assert f"figures/{name}" in text
