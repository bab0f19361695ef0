"""Extension recipes (conf/recipe/, `extension.*`) through `extend_with_expert` on the micro experiment:
each option changes only what it says."""

from __future__ import annotations

import pytest
import torch

from flows.config import compose
from flows.recipes import finetune_stages
from nexus.checkpoint import load_checkpoint, read_checkpoint_config
from nexus.errors import ConfigError
from nexus.training.freeze import param_group


def test_recipes_compose_and_map_onto_training_stages():
    protect = compose("micro", ["recipe=protect", "train.extension.max_steps=10"])
    assert protect.extension.recipe == "protect" and protect.extension.lam == 0.0
    [(name, train)] = finetune_stages(protect, "code")
    assert name == "finetune" and train.trainable == ["router", "expert:code"]
    assert train.warmup_frac == 0.0 and train.min_lr_ratio == 1.0 and train.max_steps == 10
    paper = compose(
        "micro",
        [
            "recipe=paper",
            "train.extension.max_steps=10",
            "extension.router_warmup_steps=3",
            "extension.lr_scale=0.5",
            "extension.schedule=decay",
        ],
    )
    (w, warm), (f, main) = finetune_stages(paper, "code")
    assert (w, f) == ("warmup", "finetune") and warm.max_steps + main.max_steps == 10
    assert warm.trainable == ["router", "expert:code"] and main.trainable == ["all"]
    assert (
        main.lr == warm.lr == paper.train.extension.lr / 2
        and main.warmup_frac == 0.0
        and main.min_lr_ratio < 1
    )
    for bad, key in [
        ("extension.linear_router=keep", "linear_router"),
        ("extension.schedule=step", "schedule"),
        ("extension.lam=2", "lam"),
        ("extension.trainable=[routers]", "routers"),
        ("extension.router_warmup_steps=4", "router_warmup_steps"),
    ]:
        with pytest.raises(ConfigError, match=key):
            compose("micro", [bad])


@pytest.fixture(scope="module")
def extensions(micro_moe, tmp_path_factory):
    """The session's two MoEs extended with `code`, untracked, into an output folder of their own:
    extensions of one domain share `extensions/<domain>/` (its expert and data), so extending in the
    session's folder would hand test_pipeline's tracked extension an untracked expert."""
    from flows.extend import extend_with_expert

    _, _, overrides, summary = micro_moe
    quiet = [*overrides, "tracking.enabled=false", f"out_dir={tmp_path_factory.mktemp('recipes')}"]
    moes = summary["checkpoints"]
    protect = extend_with_expert(
        "micro", [*quiet, "recipe=protect"], moe=moes["moe:nexus"], domain="code", tag="protect"
    )
    reset = extend_with_expert(
        "micro",
        [
            *quiet,
            "recipe=paper",
            "extension.linear_router=reset",
            "extension.router_warmup_steps=2",
            "extension.new_share=0.25",
        ],
        moe=moes["moe:linear"],
        domain="code",
        tag="paper-reset",
    )
    return moes, protect, reset


def test_protect_trains_only_the_new_expert_and_the_router(extensions):
    moes, protect, _ = extensions
    before = load_checkpoint(moes["moe:nexus"]).state_dict()
    appended = load_checkpoint(protect["appended_checkpoint"]).state_dict()
    after = load_checkpoint(protect["extended"]).state_dict()
    assert torch.equal(after.pop("domain_embeddings")[:2], before["domain_embeddings"])
    for key, tensor in after.items():
        group = param_group(key)
        if group == "non_ffn":
            assert torch.equal(tensor, before[key]) and torch.equal(tensor, appended[key]), (
                key
            )  # λ = 0, frozen
        elif group == "experts":
            assert torch.equal(tensor[:2], before[key]) and not torch.equal(tensor[2], appended[key][2]), key
        elif group == "shared":
            assert torch.equal(tensor, before[key]), key
    assert protect["recipe"]["recipe"] == "protect" and protect["router_fit"]["new_after"]
    assert protect["states"]["fit-router"] == "Completed"
    for model in ("appended", "after"):
        for domain, metrics in protect["divergence"][model].items():
            assert 0 <= metrics["share"] <= 1 and len(metrics["first"]) == 8, domain
    assert set(protect["divergence"]["appended"]) == {"dictionary", "lore"}  # the earlier domains
    assert all(m["never"] == 1.0 for m in protect["divergence"]["precomputed router"].values())


def test_paper_recipe_with_a_reset_linear_router_and_a_router_warmup(extensions):
    moes, _, reset = extensions
    before = load_checkpoint(moes["moe:linear"]).state_dict()
    appended = load_checkpoint(reset["appended_checkpoint"]).state_dict()
    for key in (k for k in before if k.endswith("router.weight")):
        assert all(not torch.equal(appended[key][i], before[key][i]) for i in range(2)), key
    assert {"warmup", "finetune"} <= set(reset["states"]) and "fit-router" not in reset["states"]
    warm = read_checkpoint_config(reset["extended"])["metadata"]
    assert warm["train_config"]["max_steps"] == 2 and warm["train_config"]["trainable"] == ["all"]
    assert reset["finetune_steps"] == 4 and "precomputed router" not in reset["divergence"]
    assert reset["recipe"]["linear_router"] == "reset" and reset["recipe"]["router_init"] == "random"


def test_new_share_changes_only_the_new_domains_share_of_the_mix(extensions):
    _, protect, reset = extensions
    default, quarter = protect["finetune_weights"], reset["finetune_weights"]
    assert default["code"] == pytest.approx(0.5) and quarter["code"] == pytest.approx(
        0.25
    )  # data default: 0.5
    assert sum(quarter.values()) == pytest.approx(1.0) and set(quarter) == set(default)
    earlier = [d for d in default if d != "code"]
    for d in earlier:  # the earlier domains keep their proportions
        assert quarter[d] / 0.75 == pytest.approx(default[d] / 0.5), d
