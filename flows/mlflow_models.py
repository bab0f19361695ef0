"""Nexus checkpoints as MLflow models, and lineage from MLflow's own records.

Every checkpoint a stage writes is logged as an MLflow 3 `LoggedModel` (the Logged Models tab): the
pyfunc flavour of flows/pyfunc_model.py (a model from code, loadable with
`mlflow.pyfunc.load_model`) with the checkpoint itself as its artifact `checkpoint`, so extension and
export work from `models:/...` too. Its params are the architecture, its tags the stage and the
weights' SHA-256, and it is the run's model *output*; every checkpoint a stage reads is a model *input*
of its run. Registered versions point at the logged model (`models:/<model_id>`). Paper-size
intermediate checkpoints (`tracking.upload_checkpoints: final`) are logged models without files.
Lineage is then MLflow's: model -> the run that produced it -> that run's input models -> ... back to
the seed (`flows.tracking.walk_lineage` reads it run by run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelInput, LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion

from nexus.checkpoint import WEIGHTS, read_checkpoint_config

TAG_SHA, TAG_STAGE = "nexus.checkpoint_sha256", "nexus.stage"
TAG_UPLOADED, TAG_PATH = "nexus.checkpoint_uploaded", "nexus.checkpoint_path"
MODEL_TYPE = "nexus"
CHECKPOINT_PATH = "artifacts/checkpoint"
"""Where the checkpoint lives inside a logged model's artifacts (the pyfunc's artifact `checkpoint`)."""


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


def log_checkpoint_model(
    client: MlflowClient,
    run_id: str,
    checkpoint: str | os.PathLike,
    name: str,
    step: int = 0,
    upload: bool = True,
) -> LoggedModel:
    """Log `checkpoint` as a pyfunc `LoggedModel` produced by run `run_id` (its model output). With
    `upload=False` the model gets no files (params, tags, metrics and lineage only; tag
    `nexus.checkpoint_path` says where the checkpoint is): paper-size checkpoints other runs only read."""
    import mlflow.pyfunc

    from flows import pyfunc_model

    config = read_checkpoint_config(checkpoint)
    run = client.get_run(run_id)
    tags = {TAG_SHA: config["sha256"][WEIGHTS], TAG_STAGE: run.data.tags.get(TAG_STAGE, "")}
    if not upload:
        tags.update({TAG_UPLOADED: "false", TAG_PATH: str(Path(checkpoint).resolve())})
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        model_type=MODEL_TYPE,
        tags=tags,
        params=_flat(config["model"]),
    )
    if upload:
        with tempfile.TemporaryDirectory() as tmp:
            staged = shutil.copytree(
                checkpoint, f"{tmp}/{pyfunc_model.CHECKPOINT}"
            )  # MLflow keeps the basename
            mlflow.pyfunc.save_model(
                f"{tmp}/model",
                python_model=pyfunc_model.__file__,
                artifacts={pyfunc_model.CHECKPOINT: staged},
                signature=pyfunc_model.signature(),
                input_example=pyfunc_model.input_example(),
                pip_requirements=_requirements(),
            )
            client.log_model_artifacts(model.model_id, f"{tmp}/model")
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return client.get_logged_model(model.model_id)


def _requirements() -> list[str]:
    """Given, not inferred (inference would load the model in a subprocess)."""
    from importlib.metadata import version

    return [
        f"nexus-moe=={version('nexus-moe')}",
        f"torch=={version('torch').split('+')[0]}",
        f"mlflow=={version('mlflow')}",
        f"transformers=={version('transformers')}",
    ]


def find_model(checkpoint: str | os.PathLike, client: MlflowClient) -> LoggedModel | None:
    """The most recent logged model holding these weights (any experiment), matched by SHA-256."""
    sha = read_checkpoint_config(checkpoint).get("sha256", {}).get(WEIGHTS)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not sha or not experiments:
        return None
    found = client.search_logged_models(
        experiments,
        filter_string=f"tags.`{TAG_SHA}` = '{sha}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    return found[0] if found else None


def log_model_inputs(
    client: MlflowClient, run_id: str, checkpoints: Mapping[str, str | os.PathLike]
) -> list[str]:
    """Record the logged models of the checkpoints a run reads as its model inputs; their ids."""
    ids = [m.model_id for m in (find_model(path, client) for path in checkpoints.values()) if m is not None]
    ids = list(dict.fromkeys(ids))
    if ids:
        client.log_inputs(run_id, models=[LoggedModelInput(i) for i in ids])
    return ids


def register(client: MlflowClient, name: str, model: LoggedModel, run_id: str) -> ModelVersion:
    """A new version of registered model `name` for a logged model."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(
        name,
        source=model.model_uri,
        run_id=run_id,
        model_id=model.model_id,
        tags={TAG_STAGE: model.tags.get(TAG_STAGE, "")},
    )


def checkpoint_uri(source: str, client: MlflowClient | None = None) -> str:
    """The artifact URI of the checkpoint behind a registered version's `source`: inside the logged
    model for `models:/<id>`, the source itself for versions registered from a run's artifacts."""
    if source.startswith("models:/"):
        model = (client or MlflowClient()).get_logged_model(source.removeprefix("models:/").split("/")[0])
        return f"{model.artifact_location.rstrip('/')}/{CHECKPOINT_PATH}"
    return source


def metric_label(label: str) -> str:
    """A model label as an MLflow metric-key part: `moe:nexus` -> `moe-nexus`."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def log_evaluation(
    parent_run_id: str,
    checkpoints: Mapping[str, str],
    results: Mapping[str, Any],
    client: MlflowClient | None = None,
) -> None:
    """Held-out evaluation in MLflow: on the parent run, `ppl/<label>/<domain>` and `bpb/<label>/<domain>`
    per evaluated model; on each model (its `LoggedModel` and the run that produced it), `ppl/<domain>`,
    `bpb/<domain>` and `ppl/mean`, so the runs table and the Logged Models tab line them up; the routing
    shares of every MoE as a table (`routing/<label>.json`)."""
    import time

    import pandas as pd
    from mlflow.entities import Metric

    client = client or MlflowClient()
    now = int(time.time() * 1000)
    parent = []
    for label, path in checkpoints.items():
        per_domain = results["metrics"].get(label, {})
        key = metric_label(label)
        own = []
        for domain, m in per_domain.items():
            parent += [
                Metric(f"ppl/{key}/{domain}", m["perplexity"], now, 0),
                Metric(f"bpb/{key}/{domain}", m["bits_per_byte"], now, 0),
            ]
            own += [(f"ppl/{domain}", m["perplexity"]), (f"bpb/{domain}", m["bits_per_byte"])]
        if per_domain:
            own.append(("ppl/mean", sum(m["perplexity"] for m in per_domain.values()) / len(per_domain)))
        model = find_model(path, client)
        if model is not None and model.source_run_id:
            client.log_batch(
                model.source_run_id,
                metrics=[Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in own],
            )
    for i in range(0, len(parent), 1000):
        client.log_batch(parent_run_id, metrics=parent[i : i + 1000])
    for label, routing in results.get("routing", {}).items():
        rows = [
            {"domain": d, **dict(zip(routing["experts"], shares))}
            for d, shares in zip(routing["domains"], routing["top1_share"])
        ]
        client.log_table(
            parent_run_id, data=pd.DataFrame(rows), artifact_file=f"routing/{metric_label(label)}.json"
        )


def log_figures(run_id: str, folder: str | os.PathLike, client: MlflowClient | None = None) -> None:
    """The report's PNG figures as the run's images (`figures/<name>.png`)."""
    from PIL import Image

    client = client or MlflowClient()
    for png in sorted(Path(folder).glob("*.png")):
        with Image.open(png) as image:
            client.log_image(run_id, image.convert("RGB"), artifact_file=f"figures/{png.name}")


def describe_version(
    name: str,
    version: str,
    perplexity: Mapping[str, float],
    note: str = "",
    client: MlflowClient | None = None,
) -> None:
    """A registered version's description, written from its evaluation: held-out perplexity per domain."""
    lines = [
        note,
        "",
        "| domain | held-out perplexity |",
        "|---|---|",
        *(f"| {d} | {p:.2f} |" for d, p in perplexity.items()),
    ]
    (client or MlflowClient()).update_model_version(name, version, description="\n".join(lines).strip())
