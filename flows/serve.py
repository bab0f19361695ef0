"""Deployments of the flows; the inbox extension runs on `extension.cron` / `extension.interval_seconds`."""
from __future__ import annotations

from typing import Any

from flows.config import compose


def build_deployments(experiment: str = "demo", overrides: list[str] | None = None, **options: Any) -> list[Any]:
    """RunnerDeployments for upcycle_pipeline, extend_with_expert, remove_expert, evaluate and the
    scheduled extend_from_inbox, with the experiment and overrides as default parameters; `options` go to
    every `Flow.to_deployment` (e.g. `entrypoint_type` for work-pool deployments)."""
    from flows.evaluate import evaluate
    from flows.extend import extend_from_inbox, extend_with_expert
    from flows.pipeline import upcycle_pipeline
    from flows.remove import remove_expert

    cfg = compose(experiment, overrides or [])
    params = {"experiment": experiment, "overrides": list(overrides or [])}
    schedule: dict[str, Any] = {}
    if cfg.extension.cron:
        schedule["cron"] = cfg.extension.cron
    elif cfg.extension.interval_seconds:
        schedule["interval"] = cfg.extension.interval_seconds
    return [upcycle_pipeline.to_deployment(f"{experiment}-pipeline", parameters=params, **options),
            extend_with_expert.to_deployment(f"{experiment}-extend", parameters=params, **options),
            extend_from_inbox.to_deployment(f"{experiment}-inbox", parameters=params, **schedule, **options),
            remove_expert.to_deployment(f"{experiment}-remove", parameters=params, **options),
            evaluate.to_deployment(f"{experiment}-evaluate", parameters=params, **options)]


def serve(experiment: str = "demo", overrides: list[str] | None = None) -> None:
    """Register the deployments and serve them from this process (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(experiment, overrides))
