"""GPU placement: leases keep stages on distinct GPUs (or share by config), the runner is asked for
GPUs, MoE trainings that would share GPUs are sequenced. GPU ids are plain strings here: only the
GPUs themselves cannot exist on this machine, the locking is real (threads and lock files)."""

from __future__ import annotations

import threading
import time

import pytest

from flows.placement import gpu_lease, parallel_stages, resource_annotations
from nexus.errors import ConfigError


def _hold_leases(
    tmp_path, n_stages: int, count: int, gpus: list[str], stages_per_gpu: int = 1, hold_s: float = 0.3
):
    """Run `n_stages` threads that each lease `count` GPUs for `hold_s`; returns (ids, start, end) per stage."""
    spans, lock = [], threading.Lock()

    def stage():
        with gpu_lease(count, gpus, stages_per_gpu, lock_dir=tmp_path, poll_s=0.02) as ids:
            start = time.monotonic()
            time.sleep(hold_s)
            with lock:
                spans.append((tuple(ids), start, time.monotonic()))

    threads = [threading.Thread(target=stage) for _ in range(n_stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return spans


def _max_sharing(spans) -> int:
    """The most stages that held one GPU at the same moment."""
    worst = 0
    for _, start, _ in spans:
        holders = [ids for ids, s, e in spans if s <= start < e]
        worst = max(worst, max(sum(g in ids for ids in holders) for g in {g for ids in holders for g in ids}))
    return worst


def test_parallel_stages_get_gpus_of_their_own_and_queue_for_a_free_one(tmp_path):
    spans = _hold_leases(tmp_path, n_stages=4, count=1, gpus=["0", "1"])
    assert len(spans) == 4 and {ids for ids, _, _ in spans} <= {("0",), ("1",)}
    assert _max_sharing(spans) == 1
    starts = sorted(s for _, s, _ in spans)
    assert starts[2] - starts[0] > 0.25  # the third stage waited for a GPU to be released


def test_stages_share_a_gpu_only_when_configured(tmp_path):
    spans = _hold_leases(tmp_path, n_stages=2, count=1, gpus=["0"], stages_per_gpu=2)
    assert _max_sharing(spans) == 2


def test_a_multi_gpu_stage_takes_all_of_its_gpus_or_none(tmp_path):
    spans = _hold_leases(tmp_path, n_stages=3, count=2, gpus=["0", "1", "2"])
    assert all(len(set(ids)) == 2 for ids, _, _ in spans) and _max_sharing(spans) == 1


def test_no_gpu_means_no_lease_and_too_many_is_an_error(tmp_path):
    with gpu_lease(2, [], lock_dir=tmp_path) as ids:
        assert ids == []
    with pytest.raises(ConfigError, match="asks for 3 GPUs"), gpu_lease(3, ["0", "1"], lock_dir=tmp_path):
        pass


def test_runner_annotations_and_moe_sequencing():
    import dask

    with resource_annotations("dask", 2):
        assert dask.get_annotations() == {"resources": {"GPU": 2}}
    with resource_annotations("threads", 2), resource_annotations("dask", 0):
        assert dask.get_annotations() == {}
    assert parallel_stages(devices=1, gpus=0) is None  # CPU stages are not placed
    assert parallel_stages(devices=1, gpus=1) == 1  # two MoEs on one GPU: one after another
    assert (
        parallel_stages(devices=2, gpus=4) == 2 and parallel_stages(devices=1, gpus=1, stages_per_gpu=2) == 2
    )


def test_a_stage_needing_more_gpus_than_a_machine_has_is_refused():
    """A Dask/Ray task asking for more GPUs than any worker declares would wait forever: refused first."""
    from flows.config import compose
    from flows.pipeline import placement_of

    cfg = compose("micro", ["runner.kind=dask", "runner.gpus=1", "train.expert.devices=2"])
    with pytest.raises(
        ConfigError, match=r"train.expert.devices=2: more GPUs than a machine has \(runner.gpus=1\)"
    ):
        placement_of(cfg)
    assert (
        placement_of(compose("micro", ["runner.kind=dask", "runner.gpus=2", "train.expert.devices=2"]))[
            "gpus"
        ]
        == 2
    )


def test_local_dask_cluster_declares_its_gpus():
    from flows.runners import make_runner

    assert make_runner("dask", gpus=2).cluster_kwargs["resources"] == {"GPU": 2}
    assert "resources" not in make_runner("dask", gpus=0).cluster_kwargs
