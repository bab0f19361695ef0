"""Rerunning the pipeline skips finished stages (Prefect `Cached` states); adding one domain reruns
only that domain's expert/embedding and what depends on them (upcycling, MoE training, evaluation)."""

from __future__ import annotations

import pytest

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


def _in_worker(task):
    """What a Dask worker computes for a task it received by value (as prefect-dask sends it)."""
    import inspect

    from flows.tasks import code_version

    try:
        inspect.getsource(task.fn)
        source = "readable"
    except (OSError, TypeError):
        source = "unreadable"
    return code_version(task.fn), source


@pytest.mark.slow  # a Dask cluster (~20 s); the slow Dask pipeline variant shows the rerun `Cached` too
def test_cache_keys_are_the_same_inside_a_dask_worker():
    """The key's code version is a hash of the task's compiled code: a worker that got the function
    by value (no source file: `inspect.getsource` fails there) computes the flow process's key, so
    reruns on Dask are `Cached` (tests/flows/test_multiprocess.py runs the whole pipeline twice)."""
    from distributed import Client, LocalCluster

    from flows.tasks import build_model, code_version, train_stage

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        for task in (train_stage, build_model):
            version, source = client.submit(_in_worker, task, pure=False).result()
            assert source == "unreadable" and version == code_version(task.fn)
    assert code_version(train_stage.fn) != code_version(build_model.fn)
