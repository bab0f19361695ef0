"""Prefect tasks: thin wrappers over nexus library calls, with retries and input-keyed caching.

Expensive tasks are cached on their inputs (`input_key`): every parameter except the bookkeeping
ones in `NOT_KEYED`, with checkpoint directories replaced by their weights' SHA-256 and data given by
fingerprint, plus the task's code version (a hash of its compiled code, which a Dask or Ray worker
holds too; the source file may not be there), so a rerun (after a crash, or with one more domain)
recomputes only what changed. The library stage functions are idempotent too (finished stages
return at once, interrupted ones resume from `lightning/last.ckpt`). Every task takes keyword
arguments only; parameters and results are JSON data or the frozen dataclasses of `flows.contracts`
(digested field by field), which Dask pickles.

A training stage on several devices, or on GPUs, runs as its own processes
(`nexus.training.launch`): the task waits for them and reads the result back; the stage's metrics
go from its rank 0 straight into the stage's MLflow run (the run id is in its spec), and the task
logs the result. GPUs are leased per stage (`flows.placement`). Every checkpoint is an MLflow logged
model of its stage run (params, metrics, lineage); its files are uploaded for every stage
(`tracking.upload_checkpoints: all`, the default) or, at paper size (`final`), for the final models only:
the seed, the experts and the upcycled MoEs before training are then logged models without files
(SHA-256 and path, which is all lineage needs), and never registered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import os
import time
import types
from pathlib import Path
from typing import Any

from prefect import task

from flows import names
from flows.contracts import PreparedData, StageOutcome, StageSpec, TrackingSettings
from flows.stages import get_stage
from nexus.checkpoint import sha256_file
from nexus.data.cache import fingerprint as hash_json

NOT_KEYED = {"tracking", "parent_run_id", "placement"}
UNDIGESTED = {"out_dir"}
"""Parameters and dataclass fields keyed as they are: where a task writes (a finished stage's folder
holds a checkpoint, whose digest would change the key once it ran)."""
TOKENIZER_FILE = "tokenizer.json"
FINAL_BUILDS = (names.MERGE,)
"""`build_model` kinds whose checkpoint is a result (the dense merge); upcycled and extended MoEs
are trained further, their trained checkpoints are the results."""


def _digest(value: Any) -> Any:
    """Checkpoint directories -> their weights file's SHA-256; embedding files -> their content hash;
    dataclasses (`flows.contracts`) -> their fields, digested (but `UNDIGESTED`)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: getattr(value, f.name) if f.name in UNDIGESTED else _digest(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, str) and (Path(value) / "model.safetensors").is_file():
        return sha256_file(Path(value) / "model.safetensors")  # the file, not the recorded hash: damage shows
    if isinstance(value, str) and value.endswith(".safetensors") and Path(value).is_file():
        return hashlib.sha256(Path(value).read_bytes()).hexdigest()
    if isinstance(value, dict):
        return {k: _digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    return value


def input_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key: the task's name, its code version (a changed task reruns) and its inputs' content
    (checkpoint digests, data fingerprints)."""
    keyed = {k: v if k in UNDIGESTED else _digest(v) for k, v in parameters.items() if k not in NOT_KEYED}
    return f"{context.task.name}-{hash_json([code_version(context.task.fn), keyed])}"


def code_version(fn: Any) -> str:
    """The package version and a hash of `fn`'s compiled code (bytecode, names and constants, nested
    functions included; line numbers excluded). Equal in the flow process and in a Dask/Ray worker
    that received the function by value, where `inspect.getsource` fails (no source file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("nexus-moe")
    except PackageNotFoundError:
        package = "unknown"
    return f"{package}:{_code_hash(fn.__code__)}"


@functools.cache
def _code_hash(code: types.CodeType) -> str:
    digest = hashlib.sha256()

    def visit(c: types.CodeType) -> None:
        digest.update(c.co_code)
        digest.update(repr(c.co_names).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                visit(const)
            else:  # a frozenset's repr follows the per-process string hash order: sort it
                digest.update(
                    repr(sorted(map(repr, const)) if isinstance(const, frozenset) else const).encode()
                )

    visit(code)
    return digest.hexdigest()[:16]


CACHED = {"retries": 1, "retry_delay_seconds": 2, "cache_key_fn": input_key, "persist_result": True}

OUTPUTS = {
    "train_stage": lambda p: Path(p["spec"].out_dir),
    "build_model": lambda p: Path(p["out_dir"]),
    "remove_expert": lambda p: Path(p["out_dir"]),
    "embed_domain": lambda p: Path(p["data_dir"]) / "embeddings",
}
"""Where each cached task writes: a cached result is a path into it."""


def submit(task_: Any, **kwargs: Any) -> Any:
    """`task_.submit(**kwargs)`, but a task whose output folder is gone (deleted by hand, or a new disk)
    runs again instead of returning its cached path to nothing."""
    output = OUTPUTS.get(task_.name)
    bound = inspect.signature(task_.fn).bind(**{k: v for k, v in kwargs.items() if k != "wait_for"})
    if output is not None and not output(bound.arguments).exists():
        task_ = task_.with_options(refresh_cache=True)
    return task_.submit(**kwargs)


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def tracked(
    tracking: TrackingSettings | None,
    stage: str,
    name: str,
    config: Any,
    inputs: dict[str, str] | None = None,
    system_metrics: bool = False,
):
    """An MLflow stage run under `tracking.parent_run_id`, or a null context when tracking is off."""
    from contextlib import nullcontext

    if not tracking:
        return nullcontext(None)
    from flows.tracking import configure, stage_run

    configure(tracking.uri)
    return stage_run(
        stage,
        config,
        parent_run_id=tracking.parent_run_id,
        input_checkpoints=inputs,
        run_name=name,
        system_metrics=system_metrics,
    )


@task(retries=1, retry_delay_seconds=2)
def prepare_data(
    *,
    data: dict,
    experiment: str,
    out_dir: str,
    keep: list[str] | None = None,
    extra: dict[str, str] | None = None,
    tokenizer_path: str | None = None,
) -> PreparedData:
    """Prepare the experiment's documents, tokenizer and packed splits (domain embeddings are
    `embed_domain` tasks). A tokenizer is trained on `tokenizer_domains` first, then reused for every
    domain, so adding a domain later does not change any other domain's tokens."""
    from flows.config import DataSection
    from flows.data import prepare_section

    prepared, cfg = prepare_section(DataSection(**data), experiment, out_dir, keep, extra, tokenizer_path)
    return PreparedData.describe(prepared, cfg)


@task(task_run_name="embed-{domain}", **CACHED)
def embed_domain(*, data_dir: str, embedding: dict, domain: str, data_fp: str) -> str:
    """d_i for one domain, written next to the prepared data; returns its path (`data_fp`: the domain's
    fingerprint, a cache key)."""
    from nexus.data import EmbeddingConfig, open_prepared
    from nexus.data.prepare import embed_prepared_domain

    data = open_prepared(data_dir)
    embed_prepared_domain(data, domain, EmbeddingConfig(**embedding))
    return str(data.embedding_path(domain))


def data_module(
    data_dir: str,
    weights: dict[str, float],
    train: Any,
    val_domains: list[str] | None = None,
    extra_dirs: dict[str, str] | None = None,
):
    """A MixtureDataModule over packed splits; `extra_dirs` maps domains prepared elsewhere."""
    from nexus.training.datamodule import packed_data_module

    return packed_data_module(
        data_dir, weights, train.batch_size, train.max_steps, train.seed, val_domains, extra_dirs
    )


def uploads(final: bool, tracking: TrackingSettings | None) -> bool:
    """Whether a checkpoint's files go into MLflow: a final one always, the others with
    `tracking.upload_checkpoints: all` (the default; the paper-size presets say `final`)."""
    return tracking is None or tracking.uploads(final)


def _registered_as(tracking: TrackingSettings | None, label: str) -> str | None:
    return tracking.registered_as(label) if tracking is not None else None


def record_checkpoint(
    run: Any,
    checkpoint: str | os.PathLike,
    final: bool,
    tracking: TrackingSettings | None,
    register_as: str | None = None,
) -> Any:
    """Log a checkpoint as the run's MLflow model: uploaded (and registered) when `uploads` says so, else
    a logged model with the same params, tags and lineage but no files (`nexus.checkpoint_path` says
    where they are), never registered. Returns the registered `ModelVersion`, or None."""
    upload = uploads(final, tracking)
    return run.log_checkpoint(checkpoint, register_as=register_as if upload else None, upload=upload)


def record_result(
    run: Any, result: Any, final: bool, tracking: TrackingSettings | None, register_as: str | None = None
) -> Any:
    """`record_checkpoint` for a training stage's `StageResult` (its metrics on the run and the model)."""
    upload = uploads(final, tracking)
    return run.log_result(result, register_as=register_as if upload else None, upload=upload)


def mlflow_uri(tracking: TrackingSettings) -> str:
    from flows.tracking import configure

    return configure(tracking.uri)


def own_processes(train: Any, gpus: list[str]) -> bool:
    """A stage runs as its own processes on several devices, or on GPUs (so that it sees only its own)."""
    return train.num_devices > 1 or (bool(gpus) and train.accelerator in ("auto", "gpu", "cuda"))


def registered(version: Any) -> dict[str, str] | None:
    """{name, version} of a registered `ModelVersion`, or None."""
    return {"name": version.name, "version": str(version.version)} if version else None


@task(task_run_name="{spec.stage}-{spec.name}", **CACHED)
def train_stage(
    *,
    spec: StageSpec,
    torch_threads: int = 0,
    tracking: TrackingSettings | None = None,
    placement: dict | None = None,
) -> StageOutcome:
    """One training stage (a registered stage of `flows.stages`) through `nexus.training`, in this
    process or (several devices, GPUs) as its own processes; `placement` = {"stages_per_gpu"}."""
    started = time.time()
    from flows.placement import gpu_lease, visible_gpus
    from nexus.training import StageResult
    from nexus.training import run_stage as library
    from nexus.training.launch import launch_stage

    _threads(torch_threads)
    stage, cfg = get_stage(spec.stage), spec.train
    data = {
        "dir": spec.data_dir,
        "weights": spec.weights,
        "val_domains": spec.val_domains,
        "extra_dirs": spec.extra_dirs,
    }
    job = library.StageSpec(
        stage.kind,
        dataclasses.asdict(cfg),
        data,
        spec.out_dir,
        spec.init_checkpoint,
        spec.model,
        spec.metadata,
        {TOKENIZER_FILE: str(Path(spec.data_dir) / "tokenizer" / TOKENIZER_FILE)},
        torch_threads=torch_threads,
    )
    gpus = visible_gpus() if cfg.accelerator != "cpu" else []
    inputs = {"init": spec.init_checkpoint} if spec.init_checkpoint else None
    version = None
    logged = {"train": cfg, "weights": spec.weights, "model": spec.model}
    with tracked(tracking, stage.tracking_tag, spec.name, logged, inputs, system_metrics=True) as run:
        if run is not None:
            run.log_data_module(
                data_module(spec.data_dir, spec.weights, cfg, spec.val_domains, spec.extra_dirs),
                source=spec.data_dir,
            )
        if own_processes(cfg, gpus):
            env = {}
            if run is not None:  # rank 0 of the stage logs into this run (the URI, maybe with a password,
                # goes by environment, not into the spec file)
                job.logger, job.logger_kwargs = "flows.tracking:_StageLogger", {"run_id": run.run_id}
                env["MLFLOW_TRACKING_URI"] = mlflow_uri(tracking)
            stages_per_gpu = (placement or {}).get("stages_per_gpu", 1)
            with gpu_lease(cfg.num_devices if gpus else 0, gpus, stages_per_gpu) as leased:
                if leased:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
                got = launch_stage(job, cfg.num_devices, env)
            result = StageResult(
                Path(got["checkpoint"]),
                got["metrics"],
                got["global_step"],
                got["resumed_from_step"],
                got["fingerprint"],
            )
        else:
            result = library.run_spec(job, loggers=[run.logger()] if run is not None else [])
        if run is not None:
            version = record_result(run, result, stage.final, tracking, _registered_as(tracking, spec.name))
    return StageOutcome(
        checkpoint=str(result.checkpoint),
        metrics=result.metrics,
        global_step=result.global_step,
        resumed_from_step=result.resumed_from_step,
        run_id=run.run_id if run is not None else None,
        registered=registered(version),
        started=started,
        finished=time.time(),
        pid=os.getpid(),
    )


@task(task_run_name="build-{kind}", **CACHED)
def build_model(
    *,
    kind: str,
    out_dir: str,
    seed: str,
    experts: dict[str, str],
    embeddings: dict[str, str] | None = None,
    moe: str | None = None,
    moe_options: dict | None = None,
    lam: float | None = None,
    metadata: dict | None = None,
    init_seed: int = 0,
    extend_options: dict | None = None,
    tracking: TrackingSettings | None = None,
) -> str:
    """Combine checkpoints (nexus.upcycling): kind `nexus`/`linear` (upcycle), `merge` (dense merge),
    `sparse` (sparse upcycling of the seed), `extend` (the MoE `moe` with the one expert of `experts`;
    `extend_options`: further keywords of `extend`, e.g. `linear_router`)."""
    from nexus.checkpoint import load_checkpoint, save_checkpoint
    from nexus.data import load_domain_embeddings
    from nexus.upcycling import extend, merge_dense, sparse_upcycle, upcycle

    opts = moe_options or {}
    load = {name: load_checkpoint(path) for name, path in experts.items()}
    domains = list(experts)
    emb = load_domain_embeddings(list(embeddings.values()), domains)[1] if embeddings else None
    if kind == "extend":
        if moe is None or len(domains) != 1:
            raise ValueError("build_model(kind='extend') takes the MoE `moe` and one new expert")
        model = extend(
            load_checkpoint(moe),
            load[domains[0]],
            domain_embedding=emb[0] if emb is not None else None,
            name=domains[0],
            lam=lam,
            init_seed=init_seed,
            **(extend_options or {}),
        )
    elif kind == names.MERGE:
        model = merge_dense(load_checkpoint(seed), [load[n] for n in domains])
    elif kind == "sparse":
        model = sparse_upcycle(load_checkpoint(seed), len(domains), init_seed=init_seed, **opts)
    else:
        model = upcycle(
            load_checkpoint(seed),
            [load[n] for n in domains],
            domain_embeddings=emb,
            router=kind,
            expert_names=domains,
            init_seed=init_seed,
            **opts,
        )
    inputs = {
        "seed": seed,
        **({"moe": moe} if moe else {}),
        **{names.expert(n): p for n, p in experts.items()},
    }
    with tracked(
        tracking,
        "upcycle" if kind != "extend" else "extend",
        names.build(kind),
        {"kind": kind, "init_seed": init_seed, **opts},
        inputs,
    ) as run:
        path = save_checkpoint(
            model,
            out_dir,
            metadata={**(metadata or {}), "built": kind},
            extra_files={TOKENIZER_FILE: Path(seed) / TOKENIZER_FILE},
        )
        if run is not None:
            record_checkpoint(
                run, path, kind in FINAL_BUILDS, tracking, _registered_as(tracking, names.build(kind))
            )
    return str(path)


@task(name="remove_expert", task_run_name="remove-{domain}", **CACHED)
def remove_domain_expert(
    *,
    moe: str,
    domain: str,
    out_dir: str,
    metadata: dict | None = None,
    tracking: TrackingSettings | None = None,
) -> dict:
    """Drop `domain`'s routed expert from the MoE `moe` (nexus.upcycling.remove_expert); returns
    `{checkpoint, registered}` (registered: {name, version} or None)."""
    from nexus.checkpoint import load_checkpoint, save_checkpoint
    from nexus.upcycling import remove_expert

    model = remove_expert(load_checkpoint(moe), domain)
    with tracked(tracking, "remove", names.removal(domain), {"remove": domain}, {"moe": moe}) as run:
        path = save_checkpoint(
            model,
            out_dir,
            metadata={**(metadata or {}), "built": "remove"},
            extra_files={TOKENIZER_FILE: Path(moe) / TOKENIZER_FILE},
        )
        version = (
            run.log_checkpoint(path, register_as=_registered_as(tracking, names.removal(domain)))
            if run is not None
            else None
        )
    return {"checkpoint": str(path), "registered": registered(version)}


@task(task_run_name="evaluate", **CACHED)
def evaluate_models(
    *,
    checkpoints: dict[str, str],
    splits: dict[str, str],
    split: str = "test",
    batch_size: int = 8,
    max_tokens: int | None = None,
    torch_threads: int = 0,
    device: str = "auto",
) -> dict:
    """Held-out perplexity per model and domain, and routing shares of every MoE, on at most
    `max_tokens` tokens per domain (read from the memory-mapped split, nothing more), on `device`
    ("auto": a leased GPU when there is one, else the CPU).

    `splits`: {domain: prepared data dir}. Returns {"perplexity": {model: {domain: ppl}},
    "loss": ..., "metrics": {model: {domain: Perplexity.to_dict()}}, "routing": {model: {"experts",
    "domains", "top1_share" (domains x experts)}}, "routing_analysis": {model: RoutingAnalysis.to_dict()},
    "embeddings": {Nexus model: EmbeddingGeometry.to_dict()}}."""
    from flows.placement import gpu_lease, visible_gpus

    _threads(torch_threads)
    gpus = visible_gpus() if device == "auto" else []
    with gpu_lease(1 if gpus else 0, gpus) as leased:
        where = f"cuda:{gpus.index(leased[0])}" if leased else ("cpu" if device == "auto" else device)
        return _evaluate(checkpoints, splits, split, batch_size, max_tokens, where)


def _evaluate(
    checkpoints: dict[str, str],
    splits: dict[str, str],
    split: str,
    batch_size: int,
    max_tokens: int | None,
    device: str,
) -> dict:
    from nexus.checkpoint import load_checkpoint
    from nexus.data import open_prepared
    from nexus.evaluation import analyze_routing, domain_perplexities, embedding_geometry

    opened = {p: open_prepared(p) for p in set(splits.values())}
    tokens = {d: opened[p].packed(d, split).tokens for d, p in splits.items()}
    tokens = {d: t[: max_tokens + 1] if max_tokens else t for d, t in tokens.items()}
    tokenizer = next(iter(opened.values())).load_tokenizer()
    out: dict[str, dict] = {
        "perplexity": {},
        "loss": {},
        "metrics": {},
        "routing": {},
        "routing_analysis": {},
        "embeddings": {},
    }
    for name, path in checkpoints.items():
        model = load_checkpoint(path, device=device).eval()
        ppl = domain_perplexities(model, tokens, tokenizer, batch_size=batch_size)
        out["perplexity"][name] = {d: p.perplexity for d, p in ppl.items()}
        out["loss"][name] = {d: p.loss for d, p in ppl.items()}
        out["metrics"][name] = {d: p.to_dict() for d, p in ppl.items()}
        if model.config.is_moe:
            routing = analyze_routing(model, tokens, batch_size=batch_size)
            out["routing"][name] = {
                "experts": routing.experts,
                "domains": routing.domains,
                "top1_share": routing.layer_mean("top1_share").tolist(),
            }
            out["routing_analysis"][name] = routing.to_dict()
        if model.domain_embeddings is not None:
            out["embeddings"][name] = embedding_geometry(model).to_dict()
    return out
