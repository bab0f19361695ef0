"""Deployments of the flows; the inbox extension runs on `extension.cron` / `extension.interval_seconds`.

Each deployment's default parameters are the experiment and its overrides, plus `home=<project home>`
(flows/home.py) so that a worker running the flow in any directory writes to the same place. The
deployments that change a model line (extend, inbox, remove) run one at a time (a deployment
concurrency limit; the model-line lock serialises them across deployments too).
"""

from __future__ import annotations

import os
from typing import Any

from flows.config import compose

LINE_CHANGING = ("extend", "inbox", "remove")
WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_DISABLE_TELEMETRY",
    "PREFECT_LOGGING_EXTRA_LOGGERS",
)


def recorded_overrides(experiment: str, overrides: list[str] | None) -> tuple[list[str], str]:
    """The overrides a deployment records (the user's, plus `home=` when not given) and the home."""
    overrides = list(overrides or [])
    cfg = compose(experiment, overrides)
    if not any(o.startswith("home=") for o in overrides):
        overrides.append(f"home={cfg.home}")
    return overrides, str(cfg.home)


def worker_env(home: str, result_storage: str | None = None) -> dict[str, str]:
    """Environment for flow runs on a worker (a work pool's `env` job variable): the project home,
    Prefect's task results (`result_storage`: a block slug, e.g. `remote-file-system/nexus-results`,
    shared by workers on several machines; else Prefect's result settings of this environment; else
    `<home>/.prefect/results`), and this machine's offline and logging settings."""
    from flows.home import HOME_ENV, PREFECT_RESULT_SETTINGS, prefect_env

    results = (
        {"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": result_storage} if result_storage else prefect_env(home)
    )
    return {
        HOME_ENV: home,
        **results,
        **{
            k: os.environ[k]
            for k in (*WORKER_ENV, *PREFECT_RESULT_SETTINGS)
            if k in os.environ and not (result_storage and k in PREFECT_RESULT_SETTINGS)
        },
    }


def build_deployments(
    experiment: str = "demo", overrides: list[str] | None = None, **options: Any
) -> list[Any]:
    """RunnerDeployments for upcycle_pipeline, extend_with_expert, remove_expert, evaluate and the
    scheduled extend_from_inbox, with the experiment and overrides (and the project home) as default
    parameters; `options` go to every `Flow.to_deployment` (e.g. `entrypoint_type`, `job_variables`)."""
    from flows.evaluate import evaluate
    from flows.extend import extend_from_inbox, extend_with_expert
    from flows.pipeline import upcycle_pipeline
    from flows.remove import remove_expert

    recorded, _ = recorded_overrides(experiment, overrides)
    cfg = compose(experiment, recorded)
    params = {"experiment": experiment, "overrides": recorded}
    schedule: dict[str, Any] = {}
    if cfg.extension.cron:
        schedule["cron"] = cfg.extension.cron
    elif cfg.extension.interval_seconds:
        schedule["interval"] = cfg.extension.interval_seconds
    one_at_a_time = {"concurrency_limit": 1}
    return [
        upcycle_pipeline.to_deployment(f"{experiment}-pipeline", parameters=params, **options),
        extend_with_expert.to_deployment(
            f"{experiment}-extend", parameters=params, **one_at_a_time, **options
        ),
        extend_from_inbox.to_deployment(
            f"{experiment}-inbox", parameters=params, **schedule, **one_at_a_time, **options
        ),
        remove_expert.to_deployment(f"{experiment}-remove", parameters=params, **one_at_a_time, **options),
        evaluate.to_deployment(f"{experiment}-evaluate", parameters=params, **options),
    ]


def serve(experiment: str = "demo", overrides: list[str] | None = None) -> None:
    """Register the deployments and serve them from this process (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(experiment, overrides))
