"""The demo pipeline's wall time split into model compute and everything else; peak RSS per stage.

Runs `upcycle_pipeline` (experiment `demo`; `--quick`: a third of the steps; `--smoke`: the
`micro` experiment) in this process, on a fresh output directory, SQLite MLflow store and ephemeral
Prefect server, as `make demo` does. The library calls that do the work are timed from inside
(wrapped for the run): training (`train_dense`/`train_moe`, checkpoint writes excluded),
evaluation, domain embeddings, upcycling and data preparation. Stages run in parallel, so
`compute` is the union of their intervals; everything else (Prefect, MLflow, imports, checkpoint
I/O, waiting) is `wall − compute`. A sampler thread reads the process RSS every 50 ms; a stage's
peak is the largest sample while it ran (the process's, shared by stages running at once).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import parser, print_table, write_results

# (module, attribute) -> category; the flows import these names from the modules when a task runs
TIMED = {
    ("nexus.data", "prepare_experiment"): "data preparation",
    ("nexus.data.prepare", "embed_prepared_domain"): "domain embeddings",
    ("nexus.training", "train_dense"): "training",
    ("nexus.training", "train_moe"): "training",
    ("nexus.upcycling", "upcycle"): "upcycling",
    ("nexus.upcycling", "merge_dense"): "upcycling",
    ("nexus.evaluation", "domain_perplexities"): "evaluation",
    ("nexus.evaluation", "analyze_routing"): "evaluation",
    ("nexus.training.stages", "save_checkpoint"): "checkpoint I/O",
    ("nexus.checkpoint", "load_checkpoint"): "checkpoint I/O",
    ("nexus.checkpoint", "save_checkpoint"): "checkpoint I/O",
}
COMPUTE = ("training", "evaluation", "domain embeddings", "upcycling", "data preparation")


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(max(s, t), min(e, f)) for s, e in union(a) for t, f in union(b) if max(s, t) < min(e, f)]


class Recorder:
    """Intervals per category (wrapping TIMED) and an RSS sampler."""

    def __init__(self) -> None:
        self.intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._saved: list[tuple[object, str, Callable]] = []

    def wrap(self) -> None:
        for (module_name, attr), category in TIMED.items():
            module = importlib.import_module(module_name)
            fn = getattr(module, attr)
            self._saved.append((module, attr, fn))
            setattr(module, attr, self._timed(fn, category))

    def _timed(self, fn: Callable, category: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.intervals[category].append((start, time.time()))

        return timed

    def __enter__(self) -> Recorder:
        import psutil

        process = psutil.Process()

        def sample() -> None:
            while not self._stop.wait(0.05):
                self.rss.append((time.time(), process.memory_info().rss))

        self.wrap()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for module, attr, fn in self._saved:
            setattr(module, attr, fn)

    def peak_rss_mb(self, intervals: list[tuple[float, float]]) -> float:
        samples = [r for t, r in self.rss if any(a <= t <= b for a, b in intervals)]
        return round(max(samples, default=0) / 2**20, 1)


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    from flows.home import offline_env

    offline_env()
    from flows.pipeline import upcycle_pipeline

    out = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    experiment = "micro" if args.smoke else "demo"
    overrides = [f"out_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db"]
    if args.smoke:
        overrides.append(f"data.cache_dir={out}/cache")
    if args.quick:
        overrides += ["train.seed.max_steps=70", "train.expert.max_steps=50", "train.moe.max_steps=50"]
    with Recorder() as rec:
        start = time.time()
        summary = upcycle_pipeline(experiment, overrides)
        wall = time.time() - start
    io = rec.intervals["checkpoint I/O"]
    compute_all = [i for c in COMPUTE for i in rec.intervals[c]]
    compute = length(compute_all) - length(intersect(compute_all, io))
    rows = [
        {
            "stage": c,
            "calls": len(rec.intervals[c]),
            "sum_s": round(sum(b - a for a, b in rec.intervals[c]), 1),
            "union_s": round(length(rec.intervals[c]), 1),
            "peak_rss_mb": rec.peak_rss_mb(rec.intervals[c]),
        }
        for c in (*COMPUTE, "checkpoint I/O")
    ]
    result = {
        "experiment": experiment,
        "wall_s": round(wall, 1),
        "compute_s": round(compute, 1),
        "other_s": round(wall - compute, 1),
        "other_fraction": round((wall - compute) / wall, 4),
        "pipeline_reported_s": summary["seconds"],
        "peak_rss_mb": rec.peak_rss_mb([(start, time.time())]),
        "out_dir": str(out),
        "target_other_fraction": 0.10,
    }
    return result, rows


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    result, rows = run(args)
    print_table(
        f"pipeline `{result['experiment']}`: wall {result['wall_s']} s, model compute {result['compute_s']} s, "
        f"everything else {result['other_s']} s ({100 * result['other_fraction']:.1f} %, target <= 10 %), "
        f"peak RSS {result['peak_rss_mb']} MB",
        rows,
        ["stage", "calls", "sum_s", "union_s", "peak_rss_mb"],
    )
    path = write_results(
        "pipeline", args, {"experiment": result["experiment"], "quick": args.quick}, rows, result
    )
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
