"""`nexus deploy`: register the flows' deployments on a Prefect work pool, for workers to run.

`nexus serve` runs deployments inside its own process; a work pool instead lets any number of
workers (a process worker here, Docker or Kubernetes workers on a cluster) pick up runs triggered
from the UI. Entrypoints are module paths (`flows.pipeline.upcycle_pipeline`), so a worker needs
only the installed package: no image build and no remote code storage.
"""
from __future__ import annotations

import argparse
from typing import Any

from nexus.errors import ConfigError


def deploy(pool: str, experiment: str = "demo", overrides: list[str] | None = None,
           image: str | None = None) -> list[Any]:
    """Create (or update) the deployments on work pool `pool`; returns their ids. `image`: the worker
    image (e.g. `nexus-worker:cuda`) for Docker or Kubernetes work pools.

    Uses `RunnerDeployment.apply` rather than `prefect.deploy`, whose worker look-up (only for a
    printed hint) sends `limit=null`, which Prefect 3.8's own server rejects with HTTP 422."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    from flows.serve import build_deployments

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound as err:
            raise ConfigError(f"work pool {pool!r} does not exist: `prefect work-pool create {pool} --type process`") from err
    deployments = build_deployments(experiment, overrides, entrypoint_type=EntrypointType.MODULE_PATH)
    return [d.apply(work_pool_name=pool, image=image) for d in deployments]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="register the flows' deployments on a Prefect work pool")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value (the runs' defaults)")
    parser.add_argument("--pool", required=True, help="work pool name (create it with `prefect work-pool create`)")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--image", default=None, help="worker image for Docker/Kubernetes work pools")
    parser.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    from flows.cli import offline_env

    offline_env()
    ids = deploy(args.pool, args.experiment, args.overrides, args.image)
    print(f"{len(ids)} deployments on work pool {args.pool!r}")
    return 0
