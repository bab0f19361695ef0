"""What every benchmark shares: one timing helper, the CLI, machine info, tables and the JSON writer.

Timing is interleaved: each repeat runs every candidate once, in turn, so a load spike on this
shared machine hits all candidates alike; the median over repeats is reported. Both wall time and
the process's CPU time are recorded: with one thread, CPU time is the work done and is robust to
other processes taking the cores, wall time is what a user waits for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Timing:
    """Medians over repeats of one candidate, in seconds per call."""

    wall_s: float
    cpu_s: float
    repeats: int
    wall_all: list[float]


def measure(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run each candidate `warmup` times, then `repeats` interleaved rounds; medians per candidate."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        k: Timing(
            statistics.median(wall[k]), statistics.median(cpu[k]), repeats, [round(t, 6) for t in wall[k]]
        )
        for k in candidates
    }


def ratio(num: Timing, den: Timing) -> dict[str, float]:
    """Throughput of `num` relative to `den` (>1: `num` is faster): `den time / num time`."""
    return {"wall": round(den.wall_s / num.wall_s, 4), "cpu": round(den.cpu_s / num.cpu_s, 4)}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a reduced sweep (about a minute)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks that it runs")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads are "
        "descheduled mid-GEMM and run several times slower)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON results go")
    return p


def setup(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(
    name: str,
    args: argparse.Namespace,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    summary: dict[str, Any] | None = None,
) -> Path:
    """`<out>/<name>[-quick|-smoke].json`: machine, config, per-shape rows and a summary."""
    mode = "-smoke" if args.smoke else "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}{mode}.json"
    payload = {
        "benchmark": name,
        "mode": mode.lstrip("-") or "full",
        "machine": machine_info(),
        "config": config,
        "summary": summary or {},
        "rows": rows,
    }
    path.write_text(
        json.dumps(
            payload, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
        )
    )
    return path


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A fixed-width table of `columns` from `rows` (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print(f"\n## {title}  (load average {' '.join(map(str, machine_info()['loadavg']))})")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
