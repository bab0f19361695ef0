"""The stage registry (flows/stages.py): every conf/train/*.yaml configures exactly the stages that read
a section of their own, the others derive theirs; `stage_spec` gives each stage its mix and config."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from flows.config import CONF_DIR, compose
from flows.contracts import PreparedData
from flows.stages import STAGES, configured_stages, get_stage, stage_spec
from nexus.errors import ConfigError

DATA = PreparedData(
    dir="/data",
    seq_len=32,
    vocab_size=300,
    tokenizer="/data/tokenizer.json",
    fingerprints={"dictionary": "f1", "lore": "f2"},
    token_counts={"dictionary": 1000, "lore": 3000},
    config={"mixture": {}, "embedding": {}},
)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_train_preset_configures_each_configured_stage(path):
    """A stage missing from a preset would silently train with TrainConfig's defaults (1,000 steps)."""
    sections = set(yaml.safe_load(path.read_text()))
    expected = {s.name for s in configured_stages()}
    assert sections == expected, f"{path}: sections {sorted(sections)}, expected {sorted(expected)}"


def test_stage_specs_of_the_micro_experiment(tmp_path):
    cfg = compose("micro", [f"home={tmp_path}"])
    seed = stage_spec("seed", "seed", cfg, DATA, "/out/seed", model={"d_model": 32})
    assert seed.train == cfg.train.seed and seed.init_checkpoint is None
    assert set(seed.weights) == {"dictionary", "lore"} and seed.val_domains == list(seed.weights)
    assert seed.weights["lore"] == pytest.approx(0.75)

    expert = stage_spec("expert", "lore", cfg, DATA, "/out/experts/lore", domain="lore", init_checkpoint="s")
    assert expert.weights == {"lore": 1.0} and expert.val_domains == ["lore"]
    assert expert.train == cfg.train.expert and expert.data_fp != seed.data_fp

    # the continued seed: train.moe's settings, for (at least, by less than a step) the tokens of the two
    # experts and one MoE together; batch sizes that do not divide them
    cfg = compose("micro", [f"home={tmp_path}", "train.moe.batch_size=5", "train.expert.batch_size=3"])
    continued = stage_spec("seed-continued", "seed-continued", cfg, DATA, "/out/c", init_checkpoint="s")
    tokens = 2 * cfg.train.expert.max_steps * 3 + cfg.train.moe.max_steps * 5
    assert (continued.train.max_steps - 1) * 5 < tokens <= continued.train.max_steps * 5
    assert continued.train == dataclasses.replace(cfg.train.moe, max_steps=continued.train.max_steps)
    assert continued.weights == stage_spec("moe", "nexus", cfg, DATA, "/out/moe").weights
    assert get_stage("seed-continued").tracking_tag == "seed" and get_stage("seed-continued").final


def test_registry_names_its_stages():
    assert {"seed", "expert", "moe", "extension"} <= set(STAGES)
    assert all(s.kind in ("dense", "moe") for s in STAGES.values())
    with pytest.raises(ConfigError, match="unknown training stage 'polish'.*registered"):
        get_stage("polish")
