"""lm-eval on a model directory: a Nexus checkpoint through the `nexus` model class, a transformers
directory (e.g. a `nexus export`) through lm-eval's own `hf` class with `trust_remote_code=True`.

Tasks are any that lm-eval finds: the offline held-out suite of a prepared experiment
(`heldout_suite`, `nexus.evaluation.tasks`), task YAMLs under an include path, or lm-eval's own
tasks (indexing those costs ~10 s, so it happens only when a task is not found otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nexus.errors import ConfigError

NEXUS_FORMAT = "nexus-checkpoint"


def model_spec(path: str | os.PathLike, dtype: str | None = None) -> tuple[str, dict[str, Any]]:
    """(lm-eval model name, model_args) for a Nexus checkpoint or a transformers directory."""
    from nexus.checkpoint import read_json

    path = Path(path)
    config = read_json(path / "config.json")
    extra = {"dtype": dtype} if dtype else {}
    if config.get("format") == NEXUS_FORMAT:
        import nexus.evaluation.lm_eval_adapter  # noqa: F401  (registers "nexus")

        return "nexus", {"path": str(path), **extra}
    if "architectures" not in config and "model_type" not in config:
        raise ConfigError(f"{path / 'config.json'}: neither a Nexus checkpoint nor a transformers model")
    return "hf", {"pretrained": str(path), "trust_remote_code": True, **extra}


def heldout_suite(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    domains: Sequence[str] | None = None,
    split: str = "test",
    max_documents: int | None = None,
):
    """The offline perplexity suite (`nexus_heldout_<domain>`, group `nexus_heldout`) of a prepared
    experiment's held-out documents (`nexus data prepare`), written under `out_dir`."""
    from nexus.data import open_prepared
    from nexus.evaluation.tasks import split_texts, write_task_suite

    data = open_prepared(data_dir)
    tokenizer = data.load_tokenizer()
    texts = {d: split_texts(data.packed(d, split), tokenizer, max_documents) for d in domains or data.domains}
    return write_task_suite(texts, out_dir)


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()):
    """A TaskManager that knows `tasks`: the include paths alone when they have them all."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if all(manager.match_tasks([t]) for t in tasks):
            return manager
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(
            f"lm-eval task(s) {unknown} not found (include paths: {paths or 'none'}); see `lm-eval ls tasks`"
        )
    return manager


def run_lm_eval(
    path: str | os.PathLike,
    tasks: Sequence[str],
    include_paths: Sequence[str | os.PathLike] = (),
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict (`results`, `versions`, `n-shot`, `config`, …; no per-sample logs)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise ConfigError("no lm-eval tasks: give task names and/or a prepared experiment's held-out suite")
    model, model_args = model_spec(path, dtype)
    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=task_manager(tasks, include_paths),
        log_samples=False,
        bootstrap_iters=0,
        batch_size=batch_size,
        device=device,
    )
    return {k: v for k, v in (out or {}).items() if k != "samples"}


def lm_eval_rows(results: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(task, metric, value) from lm-eval's results (`{"results": {task: {"metric,filter": v}}}`);
    a filter other than `none` is appended to the metric name."""
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt and not name.endswith("_stderr") and isinstance(value, (int, float)):
                rows.append((task, name if filt == "none" else f"{name}_{filt}", float(value)))
    return rows
