"""MLflow tracking of the pipeline: one experiment per pipeline invocation, one parent run, one nested
run per stage, and lineage that can be walked from any model back to the seed using the store alone.

Every checkpoint a stage writes is an MLflow model (flows/mlflow_models.py: a `LoggedModel` with the
pyfunc flavour, the run's model output); every checkpoint it reads is a model input of its run. Lineage
is therefore MLflow's own (the UI shows it); `walk_lineage` reads it run by run. Runs also carry:
  nexus.stage                 the stage ("seed", "expert", "upcycle", "moe", "extend", ...)
  nexus.checkpoint_sha256     SHA-256 of the `model.safetensors` the run wrote
  nexus.inputs                JSON {role: {path, sha256, run_id}} of the input checkpoints
  nexus.parent_runs           runs named explicitly as parents (e.g. of an lm-eval run of an export)
  dataset inputs              `mlflow.log_input`, digest = data fingerprint (first 32 hex digits: the
                              store allows 36), full fingerprint in the input tag `nexus.fingerprint`
  mlflow.source.*             the flow, the git commit (or the package version), the Prefect flow run
Input checkpoints are matched to their producing run and model by the weights' SHA-256 recorded in
their `config.json`, so a flow needs to pass no run ids around. Stage runs use `MlflowClient` with
explicit run ids (never the thread-local fluent run), so stages can run in parallel threads.
`nexus/` never imports this module.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from flows.mlflow_models import log_model_inputs
from nexus.checkpoint import WEIGHTS, read_checkpoint_config

TAG_ATTEMPT, TAG_PREVIOUS = "nexus.attempt_key", "nexus.previous_attempt"
TAG_STAGE, TAG_SHA, TAG_PARENTS, TAG_INPUTS = (
    "nexus.stage",
    "nexus.checkpoint_sha256",
    "nexus.parent_runs",
    "nexus.inputs",
)
_URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
_SECRET = re.compile(
    r"passw|secret|credential|api_?key|access_?key|private_?key|auth(?!or)|(^|[._])token$", re.IGNORECASE
)


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri` (default: $MLFLOW_TRACKING_URI, else the project home's SQLite store)."""
    from flows.home import project_home
    from flows.home import tracking_uri as resolve

    uri = resolve(tracking_uri, project_home())
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment (for subprocesses; ours get theirs explicitly): undo
    # that, so that $MLFLOW_TRACKING_URI keeps meaning what the user set (flows/home.py reads it).
    if user_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_env
    return uri


def _artifact_location(name: str) -> str | None:
    """For a SQLite store, file artifacts under `mlartifacts/` next to the database; else the server's."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()


def get_or_create_experiment(name: str) -> str:
    """The experiment's id; two pipelines creating it at once both get the one that won the race."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(re.sub(r"\W", "_", name)))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def resolved(config: Any) -> Any:
    """A config (dataclasses, mappings, paths, ...) as plain JSON data, credential-like keys redacted."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if isinstance(config, Mapping):
        return {str(k): "***" if _SECRET.search(str(k)) else resolved(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [resolved(v) for v in config]
    if isinstance(config, str):
        return _URI_PASSWORD.sub(r"\1***@", config)  # postgresql://user:secret@host -> user:***@host
    return (
        config
        if isinstance(config, (int, float, bool, type(None)))
        else _URI_PASSWORD.sub(r"\1***@", str(config))
    )


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as `{"a.b.c": value}` params."""
    if not isinstance(config, Mapping):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _log_params(client: MlflowClient, run_id: str, config: Any) -> None:
    params = [Param(k, str(v)[:6000]) for k, v in flatten(resolved(config)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


@contextmanager
def pipeline_run(
    experiment: str,
    run_name: str = "pipeline",
    config: Any = None,
    tags: Mapping[str, str] | None = None,
    attempt_key: str | None = None,
) -> Iterator[str]:
    """The parent run of one pipeline invocation; yields its run id. Ends FAILED on an exception.

    Runs with the same `attempt_key` (e.g. flow + output directory) are attempts at the same work:
    an earlier attempt that did not finish is linked (`nexus.previous_attempt`), and if its process
    was killed (runs left RUNNING) it and its stage runs are marked FAILED first."""
    client = MlflowClient()
    experiment_id = get_or_create_experiment(experiment)
    extra = {}
    if attempt_key is not None:
        extra[TAG_ATTEMPT] = attempt_key
        previous = _close_previous_attempt(client, experiment_id, attempt_key)
        if previous:
            extra[TAG_PREVIOUS] = previous
    run = client.create_run(
        experiment_id,
        tags={MLFLOW_RUN_NAME: run_name, TAG_STAGE: "pipeline", **extra, **source_tags(), **(tags or {})},
    )
    with _terminated(client, run.info.run_id):
        if config is not None:
            _log_params(client, run.info.run_id, config)
        yield run.info.run_id


def _close_previous_attempt(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    """The latest earlier attempt's run id if it did not finish; RUNNING leftovers become FAILED."""
    quoted = key.replace("'", "\\'")
    earlier = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ATTEMPT}` = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    failed = RunStatus.to_string(RunStatus.FAILED)
    for run in (r for r in earlier if r.info.status == "RUNNING"):  # killed: nothing ended it
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        for child in (c for c in children if c.info.status == "RUNNING"):
            client.set_terminated(child.info.run_id, failed)
        client.set_terminated(run.info.run_id, failed)
    return earlier[0].info.run_id if earlier and earlier[0].info.status != "FINISHED" else None


@contextmanager
def _terminated(client: MlflowClient, run_id: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


class _StageLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that the stage-run context, not the Trainer, ends the run."""

    def finalize(self, status: str = "success") -> None:
        pass


@dataclass
class StageRun:
    """Handle on one stage's MLflow run (all methods log to it by id, from any thread)."""

    run_id: str
    client: MlflowClient = field(default_factory=MlflowClient)
    model_id: str | None = None
    """The logged model of the checkpoint this run wrote (set by `log_checkpoint`)."""

    def logger(self) -> MLFlowLogger:
        """A Lightning logger writing into this run (pass it to `train_dense`/`train_moe`)."""
        return _StageLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None) -> None:
        """Metrics of the run (and of its logged model `model_id`, shown in the Logged Models tab)."""
        ms = [
            Metric(k, float(v), int(time.time() * 1000), step, model_id=model_id) for k, v in metrics.items()
        ]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 1000])

    def log_dataset(
        self,
        name: str,
        fingerprint: str,
        source: str,
        context: str = "train",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
            warnings.simplefilter("ignore", UserWarning)
            src = resolve_dataset_source(source)
        dataset = MetaDataset(src, name=name, digest=fingerprint[:32])
        input_tags = [
            InputTag("mlflow.data.context", context),
            InputTag("nexus.fingerprint", fingerprint),
            *(InputTag(k, str(v)) for k, v in (tags or {}).items()),
        ]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)])

    def log_data_module(self, data: Any, source: str, name: str = "nexus-data") -> None:
        """A `MixtureDataModule` as the dataset input (digest = its fingerprint, weights as tags)."""
        desc = data.describe()
        self.log_dataset(
            name,
            desc["fingerprint"],
            source,
            tags={"weights": json.dumps(desc["weights"]), "val_domains": ",".join(desc["val_domains"])},
        )

    def log_artifacts(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_checkpoint(
        self,
        checkpoint: str | os.PathLike,
        register_as: str | None = None,
        step: int = 0,
        upload: bool = True,
    ) -> ModelVersion | None:
        """Log a nexus checkpoint directory as this run's MLflow model (flows/mlflow_models.py), tag its
        weights' SHA-256 (what later stages match their inputs against) and optionally register it as a
        new version of `register_as`. `upload=False`: the logged model without the checkpoint's files
        (params, tags and lineage only; a paper-size intermediate checkpoint), which cannot be registered."""
        from flows.mlflow_models import log_checkpoint_model, register

        if register_as and not upload:
            raise ValueError(
                f"{register_as}: a registered model version carries its checkpoint (upload=True)"
            )
        sha = read_checkpoint_config(checkpoint).get("sha256", {}).get(WEIGHTS, "")
        self.client.set_tag(self.run_id, TAG_SHA, sha)
        run = self.client.get_run(self.run_id)
        stage, name = run.data.tags.get(TAG_STAGE, ""), run.info.run_name or "model"
        model = log_checkpoint_model(
            self.client,
            self.run_id,
            checkpoint,
            name if stage in name else f"{stage}-{name}",
            step,
            upload=upload,
        )
        self.model_id = model.model_id
        return register(self.client, register_as, model, self.run_id) if register_as else None

    def log_result(
        self, result: Any, register_as: str | None = None, upload: bool = True
    ) -> ModelVersion | None:
        """A `nexus.training.StageResult`: the checkpoint (registered), its final metrics (on the run and
        on its logged model), resume info."""
        self.client.set_tag(self.run_id, "nexus.resumed_from_step", str(result.resumed_from_step))
        version = self.log_checkpoint(result.checkpoint, register_as, step=result.global_step, upload=upload)
        self.log_metrics(result.metrics, step=result.global_step, model_id=self.model_id)
        return version


def find_producing_run(checkpoint: str | os.PathLike, client: MlflowClient | None = None) -> str | None:
    """The most recent run (any experiment) that logged a checkpoint with these weights."""
    client = client or MlflowClient()
    sha = read_checkpoint_config(checkpoint).get("sha256", {}).get(WEIGHTS)
    if not sha:
        return None
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exp_ids,
        filter_string=f"tags.`{TAG_SHA}` = '{sha}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def stage_run(
    stage: str,
    config: Any = None,
    *,
    parent_run_id: str | None = None,
    input_checkpoints: Mapping[str, str | os.PathLike] | None = None,
    extra_parent_runs: Sequence[str] = (),
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """A run for one stage, nested under `parent_run_id` (default: the active fluent run).

    Logs the flattened, redacted `config` as params and as artifact `config.json`, the models of
    `input_checkpoints` ({role: checkpoint dir}) as the run's model inputs, and, with `system_metrics`,
    CPU/memory/GPU metrics while the run lasts. Ends FAILED on an exception."""
    client = MlflowClient()
    parent_id = parent_run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if parent_id is None:
        raise ValueError("stage_run needs a parent run: call it inside pipeline_run or pass parent_run_id")
    inputs = {}
    for role, path in (input_checkpoints or {}).items():
        sha = read_checkpoint_config(path).get("sha256", {}).get(WEIGHTS)
        inputs[role] = {"path": str(path), "sha256": sha, "run_id": find_producing_run(path, client)}
    run = client.create_run(
        client.get_run(parent_id).info.experiment_id,
        tags={
            MLFLOW_RUN_NAME: run_name or stage,
            MLFLOW_PARENT_RUN_ID: parent_id,
            TAG_STAGE: stage,
            TAG_PARENTS: ",".join(dict.fromkeys(extra_parent_runs)),
            TAG_INPUTS: json.dumps(inputs),
            **source_tags(),
            **(tags or {}),
        },
    )
    with _terminated(client, run.info.run_id), _system_metrics(run.info.run_id, system_metrics):
        log_model_inputs(client, run.info.run_id, input_checkpoints or {})
        if config is not None:
            _log_params(client, run.info.run_id, config)
            client.log_dict(run.info.run_id, resolved(config), "config.json")
        yield StageRun(run.info.run_id, client)


def log_gate(run_id: str, verdict: Any) -> None:
    """A promotion gate's verdict (`nexus.evaluation.GateVerdict`) on a run: metrics
    `gate/<domain>/before|after`, `gate/passed`, and tags `nexus.gate` (passed/failed), `nexus.gate_failed`."""
    metrics = {"gate/passed": float(verdict.passed)}
    for check in verdict.checks:
        metrics[f"gate/{check.domain}/before"] = check.before
        metrics[f"gate/{check.domain}/after"] = check.after
    StageRun(run_id).log_metrics(metrics)
    client = MlflowClient()
    client.set_tag(run_id, "nexus.gate", "passed" if verdict.passed else "failed")
    client.set_tag(run_id, "nexus.gate_failed", ",".join(verdict.failed_domains))


def source_tags() -> dict[str, str]:
    """What produced a run: the flow (or command), the git commit of the code (else the package
    version) and, inside a Prefect flow run, its id and UI link."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = {MLFLOW_SOURCE_TYPE: "JOB", "nexus.version": _package_version()}
    commit = _git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    try:
        from prefect import runtime

        flow_run = runtime.flow_run.id
    except Exception:
        flow_run = None
    if flow_run:
        tags.update(
            {
                MLFLOW_SOURCE_NAME: f"prefect flow {runtime.flow_run.flow_name}",
                "prefect.flow_run_id": flow_run,
                "prefect.flow_run_name": str(runtime.flow_run.name),
            }
        )
        url = runtime.flow_run.ui_url
        if url:
            tags["prefect.flow_run_url"] = url
    return tags


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nexus-moe")
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def _git_commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@contextmanager
def _system_metrics(run_id: str, enabled: bool) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network, GPU) logged to `run_id` while it runs."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        monitor.collect_metrics()  # one last sample: a stage shorter than the interval gets one too
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


@dataclass
class LineageNode:
    run_id: str
    run_name: str
    stage: str
    status: str
    checkpoint_sha256: str | None
    datasets: list[dict[str, str]]
    """{name, digest, fingerprint, context} per dataset input."""
    models: list[tuple[str, str]]
    """(registered model name, version) of the run's registered checkpoints."""
    parents: list[LineageNode]

    def walk(self) -> Iterator[LineageNode]:
        """This node and every ancestor, each once, depth first."""
        seen: set[str] = set()
        stack = [self]
        while stack:
            node = stack.pop()
            if node.run_id not in seen:
                seen.add(node.run_id)
                yield node
                stack.extend(reversed(node.parents))


def walk_lineage(
    run_id: str, client: MlflowClient | None = None, _memo: dict[str, LineageNode] | None = None
) -> LineageNode:
    """The tree of runs that produced `run_id`'s inputs, back to the seed, from the MLflow store alone:
    a run's parents are the runs that produced its model inputs (MLflow's own lineage records), plus any
    named in `nexus.parent_runs`."""
    client = client or MlflowClient()
    memo = {} if _memo is None else _memo
    if run_id in memo:
        return memo[run_id]
    run = client.get_run(run_id)
    tags = run.data.tags
    datasets = [
        {
            "name": d.dataset.name,
            "digest": d.dataset.digest,
            **{t.key.removeprefix("mlflow.data."): t.value for t in d.tags},
        }
        for d in run.inputs.dataset_inputs
    ]
    models = [(mv.name, mv.version) for mv in client.search_model_versions(f"run_id = '{run_id}'")]
    node = memo[run_id] = LineageNode(
        run_id,
        run.info.run_name,
        tags.get(TAG_STAGE, ""),
        run.info.status,
        tags.get(TAG_SHA),
        datasets,
        models,
        [],
    )
    producers = [client.get_logged_model(i.model_id).source_run_id for i in run.inputs.model_inputs or []]
    parents = dict.fromkeys(
        [*(p for p in producers if p and p != run_id), *filter(None, tags.get(TAG_PARENTS, "").split(","))]
    )
    node.parents = [walk_lineage(p, client, memo) for p in parents]
    return node
