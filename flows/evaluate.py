"""`evaluate`: held-out perplexity (and routing shares of MoEs) of any checkpoints on chosen domains."""
from __future__ import annotations

from prefect import flow

from flows.tasks import evaluate_models


@flow(name="evaluate")
def evaluate(checkpoints: dict[str, str], data_dir: str, domains: list[str] | None = None, split: str = "test",
             max_tokens: int | None = None, batch_size: int = 8) -> dict:
    """`checkpoints`: {name: checkpoint dir}; `data_dir`: a prepared experiment (`nexus data prepare`);
    `domains`: default all of its domains."""
    from nexus.data import open_prepared

    names = domains or list(open_prepared(data_dir).domains)
    return evaluate_models(checkpoints, {d: data_dir for d in names}, split, batch_size, max_tokens)
