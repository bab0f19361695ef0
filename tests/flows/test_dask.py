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
from flows.pipeline import expert_phase
from flows.runners import make_runner
from flows.stages import stage_spec
from flows.tasks import prepare_data, train_stage

from .conftest import micro_overrides


def test_experts_overlap_on_dask(prefect_harness, tmp_path):
    cfg = compose("micro", micro_overrides(tmp_path, "train.expert.max_steps=40"))
    data = prepare_data.fn(data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(tmp_path / "data"))
    model = as_dict(dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    seed_spec = stage_spec("seed", "seed", cfg, data, str(tmp_path / "seed"), model=model)
    seed = train_stage.fn(spec=seed_spec, torch_threads=1).checkpoint

    runner = make_runner("dask", workers=2, threads_per_worker=1)
    specs = {
        d: stage_spec("expert", d, cfg, data, str(tmp_path / "experts" / d), domain=d, init_checkpoint=seed)
        for d in data.domains
    }
    result = expert_phase.with_options(task_runner=runner)(specs, data, 1)
    experts = result["experts"]
    assert set(experts) == {"dictionary", "lore"}
    assert all(r.global_step == 40 for r in experts.values())
    a, b = experts.values()
    assert len({a.pid, b.pid, os.getpid()}) == 3, "experts must run in two worker processes"
    overlap = min(a.finished, b.finished) - max(a.started, b.started)
    spans = f"{a.started:.2f}-{a.finished:.2f} vs {b.started:.2f}-{b.finished:.2f}"
    assert overlap > 0, f"experts did not overlap: {spans}"
    print(f"expert tasks overlapped {overlap:.1f} s ({spans})")
