"""The expert phase on a real Dask LocalCluster (two worker processes, one thread each) through
prefect-dask: two experts train at the same time, in two different processes.

Robust under CPU contention: no speed ratio is asserted. Each expert task records the wall-clock
interval of its own body (`started` before its heavy imports, `finished` after its checkpoint is
saved) and its process id; run one after the other (a serial runner, or both on one single-thread
worker) the intervals could not intersect, whatever the load."""

from __future__ import annotations

import dataclasses
import os

from flows.config import as_dict, compose
from flows.pipeline import _fp, _weights, expert_phase
from flows.runners import make_runner
from flows.tasks import prepare_data, train_stage

from .conftest import micro_overrides


def test_experts_overlap_on_dask(prefect_harness, tmp_path):
    cfg = compose("micro", micro_overrides(tmp_path, "train.expert.max_steps=40"))
    data = prepare_data.fn(as_dict(cfg.data), cfg.name, str(tmp_path / "data"))
    weights = _weights("seed", data)
    model = as_dict(dataclasses.replace(cfg.model, vocab_size=data["vocab_size"]))
    seed = train_stage.fn(
        "seed",
        "seed",
        as_dict(cfg.train.seed),
        data["dir"],
        weights,
        str(tmp_path / "seed"),
        _fp(data, weights),
        model=model,
        torch_threads=1,
    )["checkpoint"]

    runner = make_runner("dask", workers=2, threads_per_worker=1)
    result = expert_phase.with_options(task_runner=runner)(
        data, seed, as_dict(cfg.train.expert), str(tmp_path), 1
    )
    experts = result["experts"]
    assert set(experts) == {"dictionary", "lore"}
    assert all(r["global_step"] == 40 for r in experts.values())
    a, b = experts.values()
    assert len({a["pid"], b["pid"], os.getpid()}) == 3, "experts must run in two worker processes"
    overlap = min(a["finished"], b["finished"]) - max(a["started"], b["started"])
    spans = f"{a['started']:.2f}-{a['finished']:.2f} vs {b['started']:.2f}-{b['finished']:.2f}"
    assert overlap > 0, f"experts did not overlap: {spans}"
    print(f"expert tasks overlapped {overlap:.1f} s ({spans})")
