"""Rerunning the pipeline skips finished stages (Prefect `Cached` states); adding one domain reruns
only that domain's expert/embedding and what depends on them (upcycling, MoE training, evaluation)."""
from __future__ import annotations

from flows.pipeline import upcycle_pipeline

from .conftest import micro_overrides

UPSTREAM = ["seed", "expert-dictionary", "expert-lore", "embed-dictionary", "embed-lore"]
DOWNSTREAM = ["build-nexus", "moe-nexus", "evaluate"]


def test_rerun_and_added_domain(prefect_harness, tmp_path):
    overrides = micro_overrides(tmp_path, "router.routers=[nexus]", "router.dense_merge=false")
    first = upcycle_pipeline("micro", overrides)
    assert all(first["states"][k] == "Completed" for k in UPSTREAM + DOWNSTREAM), first["states"]

    again = upcycle_pipeline("micro", overrides)
    assert all(again["states"][k] == "Cached" for k in UPSTREAM + DOWNSTREAM), again["states"]
    assert again["perplexity"] == first["perplexity"]

    added = upcycle_pipeline("micro", [*overrides, "data.domains=[dictionary,lore,python-docs]"])
    states = added["states"]
    assert all(states[k] == "Cached" for k in UPSTREAM), states
    assert states["expert-python-docs"] == "Completed" and states["embed-python-docs"] == "Completed"
    assert all(states[k] == "Completed" for k in DOWNSTREAM), states
    assert added["checkpoints"]["expert:lore"] == first["checkpoints"]["expert:lore"]
