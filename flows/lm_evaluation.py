"""`nexus eval MODEL`: lm-eval on a Nexus checkpoint, a transformers export (`nexus export`) or a
registered model (`models:/name@alias`, `models:/name/version`, a name for its `@champion`), on
the offline held-out suite of a prepared experiment (`--data`) and/or any lm-eval task (`--tasks`),
with results written to `<out>/results.json` and logged to MLflow (registered in flows.cli COMMANDS).

The MLflow run (experiment `nexus-eval` by default) has stage `eval`, the task metrics as
`<task>/<metric>`, the results file as artifact, and lineage: `nexus.parent_runs` names the run
that produced the evaluated weights (the registered version's run, or the run that logged a
checkpoint with the same SHA-256), so `flows.tracking.walk_lineage` reaches the seed from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "nexus-eval"
RESULTS = "results.json"


@dataclass
class ModelRef:
    """A model directory on disk and, for a registered model, where it came from."""

    path: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def resolve_model(ref: str, dest: str | os.PathLike, tracking_uri: str | None = None) -> ModelRef:
    """A local directory for `ref`: a directory (a checkpoint or a transformers export) as it is, or any
    registered model reference (flows/models.py: `models:/name@alias`, `models:/name/version`, a name =
    its `@champion`), fetched under `dest` when its artifacts are not local."""
    if Path(ref).is_dir():
        return ModelRef(str(Path(ref).resolve()))
    from flows.models import fetch_checkpoint
    from flows.models import resolve_model as resolve_reference
    from flows.tracking import configure

    model = resolve_reference(ref, ref, configure(tracking_uri), "model")
    return ModelRef(fetch_checkpoint(model, dest), model.name, model.version, model.run_id)


def _producing_run(model: ModelRef) -> str | None:
    """The run behind the evaluated weights: the registered version's, else the one that logged them."""
    if model.run_id:
        return model.run_id
    from flows.tracking import find_producing_run
    from nexus.checkpoint import FORMAT, read_json

    if read_json(Path(model.path) / "config.json").get("format") != FORMAT:
        return None
    return find_producing_run(model.path)


def _write(results: dict[str, Any], out: Path) -> Path:
    from nexus.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, default=str))
    return out / RESULTS


def log_results(
    results: dict[str, Any],
    model: ModelRef,
    ref: str,
    params: dict[str, Any],
    out: Path,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """One MLflow run for one evaluation (tracking URI already configured): its id goes into
    `results["nexus"]["mlflow_run_id"]`, then `<out>/results.json` is written and logged."""
    from flows.tracking import TAG_PARENTS, TAG_STAGE, StageRun, pipeline_run
    from nexus.evaluation.harness import lm_eval_rows

    parent = _producing_run(model)
    tags = {
        TAG_STAGE: "eval",
        TAG_PARENTS: parent or "",
        "nexus.model_ref": ref,
        "nexus.model_path": model.path,
    }
    if model.name:
        tags.update({"nexus.registered_model": model.name, "nexus.registered_version": model.version})
    name = f"eval:{model.name or Path(model.path).name}"
    with pipeline_run(experiment, name, config=params, tags=tags) as run_id:
        results["nexus"]["mlflow_run_id"] = run_id
        stage = StageRun(run_id)
        stage.log_metrics({f"{task}/{metric}": value for task, metric, value in lm_eval_rows(results)})
        stage.log_artifacts(_write(results, out))
    return run_id


def evaluate(
    ref: str,
    tasks: list[str],
    out_dir: str | os.PathLike,
    data_dir: str | None = None,
    domains: list[str] | None = None,
    max_documents: int | None = None,
    include_paths: list[str] | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    track: bool = True,
    **lm_eval_options: Any,
) -> dict[str, Any]:
    """Resolve `ref`, run lm-eval on `tasks` (plus the held-out suite of `data_dir`), log to MLflow
    (`track`) and write `<out_dir>/results.json`: lm-eval's results and, under `nexus`, the model
    reference, its path, registered name and version, the tasks and the MLflow run id."""
    from nexus.evaluation.harness import heldout_suite, run_lm_eval

    out = Path(out_dir)
    model = resolve_model(ref, out / "models", tracking_uri)
    paths, names = list(include_paths or []), list(tasks)
    if data_dir:
        suite = heldout_suite(data_dir, out / "tasks", domains, max_documents=max_documents)
        paths, names = [*paths, str(suite.include_path)], [*names, suite.group]
    results = run_lm_eval(model.path, names, paths, **lm_eval_options)
    results["nexus"] = {
        "model_ref": ref,
        "model_path": model.path,
        "registered_model": model.name,
        "registered_version": model.version,
        "tasks": names,
        "mlflow_run_id": None,
    }
    if not track:
        _write(results, out)
        return results
    from flows.tracking import configure

    configure(tracking_uri)
    params = {"model": ref, "tasks": ",".join(names), "data": data_dir, **lm_eval_options}
    log_results(results, model, ref, params, out, experiment)
    return results


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="lm-eval on a checkpoint, an export or models:/name@alias; logged to MLflow"
    )
    p.add_argument(
        "model",
        help="Nexus checkpoint dir, transformers dir (nexus export), or "
        "models:/<name>@<alias> | models:/<name>/<version> | models:/<name>",
    )
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task (or group) names")
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a prepared experiment (nexus data prepare): adds its held-out suite `nexus_heldout`",
    )
    p.add_argument("--domains", default=None, help="with --data: comma-separated domains (default all)")
    p.add_argument("--max-documents", type=int, default=200, help="with --data: documents per domain")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="more task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval --limit (documents, or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, metavar="DIR", help="results (default outputs/eval/<model>)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment of the run")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flows.config import TrackingSection
    from flows.home import offline_env

    offline_env()
    label = re.sub(r"[^\w.@-]+", "_", args.model.removeprefix("models:/").strip("/")) or "model"
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSection.uri
    options = {
        k: v
        for k, v in {"limit": args.limit, "num_fewshot": args.num_fewshot, "dtype": args.dtype}.items()
        if v is not None
    }
    results = evaluate(
        args.model,
        [t for t in args.tasks.split(",") if t],
        args.out or Path("outputs/eval") / label,
        args.data,
        args.domains.split(",") if args.domains else None,
        args.max_documents,
        args.include_path,
        uri,
        args.experiment,
        not args.no_tracking,
        batch_size=args.batch_size,
        device=args.device,
        **options,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    run_id = results["nexus"]["mlflow_run_id"]
    print(
        f"results: {Path(args.out or Path('outputs/eval') / label) / RESULTS}"
        + (f"; MLflow run {run_id} in {uri}" if run_id else "")
    )
    return 0
