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


def deploy(
    pool: str,
    experiment: str = "demo",
    overrides: list[str] | None = None,
    image: str | None = None,
    result_storage: str | None = None,
) -> list[Any]:
    """Create (or update) the deployments on work pool `pool`; returns their ids. `image`: the worker
    image (e.g. `nexus-worker:cuda`) for Docker or Kubernetes work pools. The project home (flows/home.py)
    is recorded in the deployments' parameters and, with Prefect's result location, in the `env` job
    variable, so a worker in any directory (or container) writes to the same place.

    Uses `RunnerDeployment.apply` rather than `prefect.deploy`, whose worker look-up (only for a
    printed hint) sends `limit=null`, which Prefect 3.8's own server rejects with HTTP 422."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    from flows.serve import build_deployments, recorded_overrides, worker_env

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound as err:
            raise ConfigError(
                f"work pool {pool!r} does not exist: `prefect work-pool create {pool} --type process`"
            ) from err
    overrides, home = recorded_overrides(experiment, overrides)
    deployments = build_deployments(
        experiment,
        overrides,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"env": worker_env(home, result_storage)},
    )
    return [d.apply(work_pool_name=pool, image=image) for d in deployments]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="register the flows' deployments on a Prefect work pool")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value (the runs' defaults)")
    parser.add_argument(
        "--pool", required=True, help="work pool name (create it with `prefect work-pool create`)"
    )
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--image", default=None, help="worker image for Docker/Kubernetes work pools")
    parser.add_argument(
        "--result-storage",
        default=None,
        metavar="BLOCK",
        help="Prefect block slug for task results shared by workers on several machines "
        "(e.g. remote-file-system/nexus-results); default: <home>/.prefect/results",
    )
    parser.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    from flows.home import offline_env

    offline_env()
    ids = deploy(args.pool, args.experiment, args.overrides, args.image, args.result_storage)
    print(f"{len(ids)} deployments on work pool {args.pool!r}")
    return 0
