"""Every benchmark runs end to end in its tiny `--smoke` mode (so they do not rot) and writes JSON."""

import json

import pytest

from benchmarks import (
    bench_bam,
    bench_data,
    bench_generation,
    bench_inference,
    bench_moe_layer,
    bench_train_step,
)


@pytest.mark.parametrize(
    "module", [bench_moe_layer, bench_train_step, bench_inference, bench_generation, bench_bam, bench_data]
)
def test_benchmark_smoke(module, tmp_path):
    summary = module.main(["--smoke", "--out", str(tmp_path)])
    assert isinstance(summary, dict)
    (result,) = tmp_path.glob("*-smoke.json")
    payload = json.loads(result.read_text())
    assert payload["machine"]["torch"] and payload["rows"]


def test_interval_arithmetic_of_the_pipeline_benchmark():
    from benchmarks.bench_pipeline import intersect, length, union

    assert union([(3, 4), (0, 2), (1, 2.5)]) == [(0, 2.5), (3, 4)]
    assert length([(0, 2), (1, 3), (5, 6)]) == 4
    assert intersect([(0, 3), (5, 8)], [(2, 6)]) == [(2, 3), (5, 6)]


def test_pipeline_benchmark_splits_wall_time_into_compute_and_the_rest(prefect_harness, tmp_path):
    from benchmarks import bench_pipeline

    summary = bench_pipeline.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["stage"]: r for r in json.loads((tmp_path / "pipeline-smoke.json").read_text())["rows"]}
    assert rows["training"]["calls"] == 5  # seed, 2 experts, 2 MoEs (micro: nexus + linear)
    assert rows["evaluation"]["calls"] >= 1 and rows["data preparation"]["calls"] >= 1
    assert all(r["union_s"] <= r["sum_s"] + 0.1 for r in rows.values())
    assert 0 < summary["compute_s"] < summary["wall_s"]
    assert abs(summary["compute_s"] + summary["other_s"] - summary["wall_s"]) < 0.2
    assert rows["training"]["peak_rss_mb"] > 100


def test_gpu_check_runs_its_cpu_parts(tmp_path):
    """`make gpu-check` on the CPU with tiny shapes: MoE parity (bf16 vs fp32, grouped vs sorted),
    the sync-free op sequence, throughput, and bf16 training steps with the paper's memory settings."""
    from benchmarks import gpu_check

    results = gpu_check.main(["--cpu", "--smoke", "--out", str(tmp_path)])
    assert set(results) == {"parity", "sync_free", "throughput", "training"}
    assert all(r["ok"] for r in results.values()), results
    assert results["parity"]["grouped_vs_sorted_fp32"]["output"] < 1e-4
    assert results["sync_free"]["same_ops_for_any_token_count"] and not results["sync_free"]["host_reads"]
    assert results["training"]["steps"] == 3
    assert json.loads((tmp_path / "gpu_check-smoke.json").read_text())["config"]["device"] == "cpu"
