"""Run every benchmark: `python -m benchmarks [--quick | --smoke] [--threads N] [--only NAME ...]`.

Each module prints its table and writes `benchmarks/results/<name>[-quick|-smoke].json`.
`bench_lightning_overhead` (Lightning's per-step overhead; its own CLI) runs too when present.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

MODULES = [
    "bench_moe_layer",
    "bench_train_step",
    "bench_inference",
    "bench_generation",
    "bench_bam",
    "bench_data",
    "bench_pipeline",
]


def run_lightning_overhead(quick: bool) -> None:
    try:
        module = importlib.import_module("benchmarks.bench_lightning_overhead")
    except ModuleNotFoundError:
        return
    argv = [module.__name__] + (["--steps", "20", "--warmup", "5", "--repeats", "1"] if quick else [])
    saved, sys.argv = sys.argv, argv
    try:
        module.main()
    finally:
        sys.argv = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", nargs="*", default=None, help=f"a subset of {MODULES + ['bench_lightning_overhead']}"
    )
    args, rest = p.parse_known_args()
    smoke, quick = "--smoke" in rest, "--quick" in rest
    t0 = time.perf_counter()
    for name in MODULES:
        if args.only is None or name in args.only:
            print(f"\n# {name}", flush=True)
            importlib.import_module(f"benchmarks.{name}").main(rest)
    if not smoke and (args.only is None or "bench_lightning_overhead" in args.only):
        print("\n# bench_lightning_overhead", flush=True)
        run_lightning_overhead(quick)
    print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
