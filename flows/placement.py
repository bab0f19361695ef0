"""Placing training stages on GPUs: which GPUs a stage gets, and what the task runner is told.

- `gpu_lease(n)`: `n` GPUs of this machine for the duration of a stage, through lock files (one per
  GPU slot) in a machine-local directory, so stages in threads, Dask worker processes or Ray tasks
  on one machine never share a GPU unless `stages_per_gpu > 1` allows it, and a stage waits for a
  free GPU instead of claiming them all. The stage process then sees only its GPUs
  (`CUDA_VISIBLE_DEVICES`). On a machine without GPUs it yields `[]` at once.
- `resource_annotations(kind, n)`: the runner-side request, so a cluster scheduler sends the task to
  a worker with `n` free GPUs: Dask `resources={"GPU": n}` (workers declare `--resources GPU=k`;
  `make_runner` does it for its LocalCluster), Ray `num_gpus=n` (Ray also sets the task's
  `CUDA_VISIBLE_DEVICES`, which `visible_gpus` respects).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

LOCK_DIR = Path(tempfile.gettempdir()) / "nexus-gpu-leases"


def visible_gpus() -> list[str]:
    """This process's GPUs by their physical ids (`CUDA_VISIBLE_DEVICES` entries when it is set)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return (
        listed[: torch.cuda.device_count()] if listed else [str(i) for i in range(torch.cuda.device_count())]
    )


def _try_lock(path: Path) -> Any:
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lease
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


@contextmanager
def gpu_lease(
    count: int,
    gpus: list[str] | None = None,
    stages_per_gpu: int = 1,
    lock_dir: Path | None = None,
    poll_s: float = 0.5,
) -> Iterator[list[str]]:
    """Hold `count` distinct GPUs of `gpus` (default `visible_gpus()`) until the block ends.

    A GPU has `stages_per_gpu` slots; a lease takes one slot on each of `count` GPUs, all or none
    (no partial holds, so two waiting stages cannot deadlock). Yields the GPU ids; `[]` when there
    are no GPUs or `count` is 0."""
    gpus = visible_gpus() if gpus is None else gpus
    if count <= 0 or not gpus:
        yield []
        return
    if count > len(gpus):
        from nexus.errors import ConfigError

        raise ConfigError(f"a stage asks for {count} GPUs; this machine has {len(gpus)} ({','.join(gpus)})")
    lock_dir = Path(lock_dir or LOCK_DIR)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        with ExitStack() as held:
            got: list[str] = []
            for gpu in gpus:
                for slot in range(stages_per_gpu):
                    handle = _try_lock(lock_dir / f"gpu-{gpu}-slot-{slot}.lock")
                    if handle is not None:
                        held.callback(handle.close)  # closing releases the flock
                        got.append(gpu)
                        break
                if len(got) == count:
                    yield got
                    return
        time.sleep(poll_s)  # released everything: wait and try again


def resource_annotations(kind: str, gpus: int):
    """A context in which `task.submit` asks the runner for `gpus` GPUs (no-op for threads or 0)."""
    if gpus <= 0 or kind == "threads":
        return nullcontext()
    if kind == "dask":
        import dask

        return dask.annotate(resources={"GPU": gpus})
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=gpus)


def parallel_stages(devices: int, gpus: int, stages_per_gpu: int = 1) -> int | None:
    """How many stages of `devices` GPUs each fit at once on `gpus` GPUs; None without GPUs (CPU
    stages are not placed)."""
    if gpus <= 0:
        return None
    return max(1, gpus * stages_per_gpu // max(1, devices))
