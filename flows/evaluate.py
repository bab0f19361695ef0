"""`evaluate`: held-out perplexity (and routing shares of MoEs) of any models on chosen domains."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from flows.config import Experiment
from flows.tasks import evaluate_models


@flow(name="evaluate")
def evaluate(
    checkpoints: dict[str, str] | None = None,
    data_dir: str | None = None,
    domains: list[str] | None = None,
    split: Literal["train", "validation", "test"] = "test",
    max_tokens: int | None = None,
    batch_size: int = 8,
    experiment: Experiment = "demo",
    overrides: list[str] | None = None,
) -> dict:
    """Held-out perplexity per model and domain, and the routing shares of MoEs.

    Args:
        checkpoints: {label: model}; a model is a checkpoint folder, `models:/<name>/<version>`,
            `models:/<name>@<alias>` or a registered name (default: the model line's `@champion`).
        data_dir: A prepared experiment (`nexus data prepare`); default: every domain where the first
            model's metadata says it was prepared.
        domains: The domains to evaluate (default: all of them).
        split: The split to evaluate on.
        max_tokens: At most this many tokens per domain and model (default: the whole split).
        batch_size: Sequences per forward pass.
        experiment: The experiment config (conf/experiment/), for the model line and the tracking store.
        overrides: Hydra `key=value` overrides.
    """
    from flows.config import compose
    from flows.models import domain_records, fetch_checkpoint, resolve_model
    from nexus.data import open_prepared

    cfg = compose(experiment, overrides or [])
    models = {
        label: resolve_model(ref, cfg.tracking.model_name, cfg.tracking.uri, f"checkpoints.{label}")
        for label, ref in (checkpoints or {"champion": None}).items()
    }
    if data_dir:
        splits = dict.fromkeys(domains or open_prepared(data_dir).domains, data_dir)
    else:
        first = next(iter(models.values()))
        records = domain_records(first.config, first.label)
        splits = {d: r["data_dir"] for d, r in records.items() if not domains or d in domains}
    paths = {
        label: fetch_checkpoint(m, Path(cfg.out_dir).resolve() / "models") for label, m in models.items()
    }
    return evaluate_models(
        checkpoints=paths, splits=splits, split=split, batch_size=batch_size, max_tokens=max_tokens
    )
