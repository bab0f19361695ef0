"""Every benchmark runs end to end in its tiny `--smoke` mode (so they do not rot) and writes JSON."""
import json

import pytest

from benchmarks import bench_data, bench_inference, bench_moe_layer, bench_train_step


@pytest.mark.parametrize("module", [bench_moe_layer, bench_train_step, bench_inference, bench_data])
def test_benchmark_smoke(module, tmp_path):
    summary = module.main(["--smoke", "--out", str(tmp_path)])
    assert isinstance(summary, dict)
    (result,) = tmp_path.glob("*-smoke.json")
    payload = json.loads(result.read_text())
    assert payload["machine"]["torch"] and payload["rows"]
