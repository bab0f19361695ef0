"""Task runner factory for the parallel phases: threads locally, Dask (prefect-dask) or Ray
(prefect-ray, when installed) for several processes or machines."""

from __future__ import annotations

from typing import Any

from nexus.errors import ConfigError


def make_runner(
    kind: str = "threads",
    workers: int = 2,
    threads_per_worker: int = 1,
    address: str | None = None,
    gpus: int | None = None,
    stages_per_gpu: int = 1,
) -> Any:
    """A Prefect task runner.

    threads: `ThreadPoolTaskRunner(max_workers=workers)`;
    dask:    `DaskTaskRunner` on a `LocalCluster` of `workers` processes with `threads_per_worker`
             threads each (so two experts train at once on two cores), or on the scheduler at `address`;
             with GPUs, each local worker declares them as resource `GPU` (the tasks ask for theirs,
             `flows.placement`; the GPU leases keep stages on a machine apart);
    ray:     `RayTaskRunner(address)` (local Ray when None)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        from flows.placement import visible_gpus

        n_gpus = len(visible_gpus()) if gpus is None else gpus
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": threads_per_worker,
                "processes": True,
                "dashboard_address": None,
                **({"resources": {"GPU": n_gpus}} if n_gpus else {}),
            },
        )
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise ConfigError("runner.kind=ray needs prefect-ray: pip install prefect-ray") from err
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ConfigError(f"runner.kind must be threads|dask|ray, got {kind!r}")
