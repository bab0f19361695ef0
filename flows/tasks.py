"""Prefect tasks: thin wrappers over nexus library calls, with retries and input-keyed caching.

Expensive tasks are cached on their inputs (`input_key`): every parameter except the bookkeeping
ones in `NOT_KEYED`, with checkpoint directories replaced by their weights' SHA-256 and data given by
fingerprint, plus the task's code version (a hash of its compiled code, which a Dask or Ray worker
holds too; the source file may not be there), so a rerun (after a crash, or with one more domain)
recomputes only what changed. The library stage functions are idempotent too (finished stages
return at once, interrupted ones resume from `lightning/last.ckpt`). Parameters and results are
plain JSON data (Dask-friendly).

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

import functools
import hashlib
import inspect
import json
import os
import time
import types
from pathlib import Path
from typing import Any

from prefect import task

from nexus.checkpoint import sha256_file
from nexus.data.cache import fingerprint as hash_json

NOT_KEYED = {"tracking", "parent_run_id", "placement"}
TOKENIZER_FILE = "tokenizer.json"
FINAL_BUILDS = ("merge",)
"""`build_model` kinds whose checkpoint is a result (the dense merge); upcycled and extended MoEs
are trained further, their trained checkpoints are the results."""


def _digest(value: Any) -> Any:
    """Checkpoint directories -> their weights file's SHA-256; embedding files -> their content hash."""
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
    keyed = {k: v if k == "out_dir" else _digest(v) for k, v in parameters.items() if k not in NOT_KEYED}
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
    "train_stage": lambda p: Path(p["out_dir"]),
    "build_model": lambda p: Path(p["out_dir"]),
    "remove_expert": lambda p: Path(p["out_dir"]),
    "embed_domain": lambda p: Path(p["data_dir"]) / "embeddings",
}
"""Where each cached task writes: a cached result is a path into it."""


def submit(task_: Any, *args: Any, **kwargs: Any) -> Any:
    """`task_.submit(...)`, but a task whose output folder is gone (deleted by hand, or a new disk)
    runs again instead of returning its cached path to nothing."""
    output = OUTPUTS.get(task_.name)
    bound = inspect.signature(task_.fn).bind(*args, **{k: v for k, v in kwargs.items() if k != "wait_for"})
    if output is not None and not output(bound.arguments).exists():
        task_ = task_.with_options(refresh_cache=True)
    return task_.submit(*args, **kwargs)


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def tracked(
    tracking: dict | None,
    stage: str,
    name: str,
    config: Any,
    inputs: dict[str, str] | None = None,
    system_metrics: bool = False,
):
    """An MLflow stage run under `tracking['parent_run_id']`, or a null context when tracking is off."""
    from contextlib import nullcontext

    if not tracking:
        return nullcontext(None)
    from flows.tracking import configure, stage_run

    configure(tracking["uri"])
    return stage_run(
        stage,
        config,
        parent_run_id=tracking["parent_run_id"],
        input_checkpoints=inputs,
        run_name=name,
        system_metrics=system_metrics,
    )


@task(retries=1, retry_delay_seconds=2)
def prepare_data(
    data: dict,
    experiment: str,
    out_dir: str,
    keep: list[str] | None = None,
    extra: dict[str, str] | None = None,
    tokenizer_path: str | None = None,
) -> dict[str, Any]:
    """Prepare the experiment's documents, tokenizer and packed splits (domain embeddings are
    `embed_domain` tasks). A tokenizer is trained on `tokenizer_domains` first, then reused for every
    domain, so adding a domain later does not change any other domain's tokens."""
    from flows.config import DataSection
    from flows.data import prepare_section

    prepared, cfg = prepare_section(DataSection(**data), experiment, out_dir, keep, extra, tokenizer_path)
    return describe_data(prepared, cfg)


def describe_data(prepared: Any, cfg: Any) -> dict[str, Any]:
    """What later tasks need: directory, per-domain fingerprints (incl. tokenizer), sizes, config."""
    import dataclasses

    return {
        "dir": str(prepared.out_dir),
        "seq_len": prepared.seq_len,
        "vocab_size": len(prepared.load_tokenizer()),
        "tokenizer": str(prepared.tokenizer_path),
        "fingerprints": {
            d: hash_json([dom.fingerprint, prepared.tokenizer_fingerprint])
            for d, dom in prepared.domains.items()
        },
        "token_counts": prepared.token_counts("train"),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }


@task(task_run_name="embed-{domain}", **CACHED)
def embed_domain(data_dir: str, embedding: dict, domain: str, data_fp: str) -> str:
    """d_i for one domain, written next to the prepared data; returns its path."""
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


def is_final(stage: str, name: str) -> bool:
    """A trained model the pipeline delivers (MoEs, extensions, baselines), not an input of a later
    stage (the pretrained seed, the dense experts)."""
    return stage != "expert" and not (stage == "seed" and name == "seed")


def uploads(final: bool, tracking: dict | None) -> bool:
    """Whether a checkpoint's files go into MLflow: a final one always, the others with
    `tracking.upload_checkpoints: all` (the default; the paper-size presets say `final`)."""
    return final or (tracking or {}).get("upload_checkpoints", "all") == "all"


def record_checkpoint(
    run: Any,
    checkpoint: str | os.PathLike,
    final: bool,
    tracking: dict | None,
    register_as: str | None = None,
) -> Any:
    """Log a checkpoint as the run's MLflow model: uploaded (and registered) when `uploads` says so, else
    a logged model with the same params, tags and lineage but no files (`nexus.checkpoint_path` says
    where they are), never registered. Returns the registered `ModelVersion`, or None."""
    upload = uploads(final, tracking)
    return run.log_checkpoint(checkpoint, register_as=register_as if upload else None, upload=upload)


def record_result(
    run: Any, result: Any, final: bool, tracking: dict | None, register_as: str | None = None
) -> Any:
    """`record_checkpoint` for a training stage's `StageResult` (its metrics on the run and the model)."""
    upload = uploads(final, tracking)
    return run.log_result(result, register_as=register_as if upload else None, upload=upload)


def mlflow_uri(tracking: dict) -> str:
    from flows.tracking import configure

    return configure(tracking["uri"])


def own_processes(train: Any, gpus: list[str]) -> bool:
    """A stage runs as its own processes on several devices, or on GPUs (so that it sees only its own)."""
    return train.num_devices > 1 or (bool(gpus) and train.accelerator in ("auto", "gpu", "cuda"))


@task(task_run_name="{stage}-{name}", **CACHED)
def train_stage(
    stage: str,
    name: str,
    train: dict,
    data_dir: str,
    weights: dict[str, float],
    out_dir: str,
    data_fp: str,
    init_checkpoint: str | None = None,
    model: dict | None = None,
    val_domains: list[str] | None = None,
    extra_dirs: dict[str, str] | None = None,
    metadata: dict | None = None,
    torch_threads: int = 0,
    tracking: dict | None = None,
    placement: dict | None = None,
) -> dict:
    """One training stage (seed / expert / moe / extension) through `nexus.training`, in this process
    or (several devices, GPUs) as its own processes; `placement` = {"stages_per_gpu"}. Returns
    `{checkpoint, metrics, global_step, resumed_from_step, run_id, registered, started, finished, pid}`
    (`registered`: {name, version} of the registered model version or None; started/finished: the
    wall-clock interval of this task body, imports included; pid: the process that ran it)."""
    started = time.time()
    from flows.placement import gpu_lease, visible_gpus
    from nexus.training import StageResult, TrainConfig
    from nexus.training.launch import launch_stage
    from nexus.training.run_stage import StageSpec, run_spec

    _threads(torch_threads)
    cfg = TrainConfig(**train)
    spec = StageSpec(
        "moe" if stage in ("moe", "extension") else "dense",
        train,
        {"dir": data_dir, "weights": weights, "val_domains": val_domains, "extra_dirs": extra_dirs},
        out_dir,
        init_checkpoint,
        model,
        metadata,
        {TOKENIZER_FILE: str(Path(data_dir) / "tokenizer" / TOKENIZER_FILE)},
        torch_threads=torch_threads,
    )
    gpus = visible_gpus() if cfg.accelerator != "cpu" else []
    inputs = {"init": init_checkpoint} if init_checkpoint else None
    version = None
    with tracked(
        tracking, stage, name, {"train": cfg, "weights": weights, "model": model}, inputs, system_metrics=True
    ) as run:
        if run is not None:
            run.log_data_module(data_module(data_dir, weights, cfg, val_domains, extra_dirs), source=data_dir)
        if own_processes(cfg, gpus):
            env = {}
            if run is not None:  # rank 0 of the stage logs into this run (the URI, maybe with a password,
                # goes by environment, not into the spec file)
                spec.logger, spec.logger_kwargs = "flows.tracking:_StageLogger", {"run_id": run.run_id}
                env["MLFLOW_TRACKING_URI"] = mlflow_uri(tracking)
            stages_per_gpu = (placement or {}).get("stages_per_gpu", 1)
            with gpu_lease(cfg.num_devices if gpus else 0, gpus, stages_per_gpu) as leased:
                if leased:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
                got = launch_stage(spec, cfg.num_devices, env)
            result = StageResult(
                Path(got["checkpoint"]),
                got["metrics"],
                got["global_step"],
                got["resumed_from_step"],
                got["fingerprint"],
            )
        else:
            result = run_spec(spec, loggers=[run.logger()] if run is not None else [])
        if run is not None:
            register = (tracking or {}).get("register", {}).get(name)
            version = record_result(run, result, is_final(stage, name), tracking, register)
    return {
        "checkpoint": str(result.checkpoint),
        "metrics": result.metrics,
        "global_step": result.global_step,
        "resumed_from_step": result.resumed_from_step,
        "run_id": run.run_id if run is not None else None,
        "registered": {"name": version.name, "version": str(version.version)} if version else None,
        "started": started,
        "finished": time.time(),
        "pid": os.getpid(),
    }


@task(task_run_name="build-{kind}", **CACHED)
def build_model(
    kind: str,
    out_dir: str,
    seed: str,
    experts: dict[str, str],
    embeddings: dict[str, str] | None = None,
    moe_options: dict | None = None,
    lam: float | None = None,
    metadata: dict | None = None,
    init_seed: int = 0,
    extend_options: dict | None = None,
    tracking: dict | None = None,
) -> str:
    """Combine checkpoints (nexus.upcycling): kind `nexus`/`linear` (upcycle), `merge` (dense merge),
    `sparse` (sparse upcycling of the seed), `extend` (`experts` = {"moe": path, <new domain>: path};
    `extend_options`: further keywords of `extend`, e.g. `linear_router`)."""
    from nexus.checkpoint import load_checkpoint, save_checkpoint
    from nexus.data import load_domain_embeddings
    from nexus.upcycling import extend, merge_dense, sparse_upcycle, upcycle

    opts = moe_options or {}
    load = {name: load_checkpoint(path) for name, path in experts.items()}
    names = [n for n in experts if n != "moe"]
    emb = load_domain_embeddings(list(embeddings.values()), names)[1] if embeddings else None
    if kind == "extend":
        model = extend(
            load["moe"],
            load[names[0]],
            domain_embedding=emb[0] if emb is not None else None,
            name=names[0],
            lam=lam,
            init_seed=init_seed,
            **(extend_options or {}),
        )
    elif kind == "merge":
        model = merge_dense(load_checkpoint(seed), [load[n] for n in names])
    elif kind == "sparse":
        model = sparse_upcycle(load_checkpoint(seed), len(names), init_seed=init_seed, **opts)
    else:
        model = upcycle(
            load_checkpoint(seed),
            [load[n] for n in names],
            domain_embeddings=emb,
            router=kind,
            expert_names=names,
            init_seed=init_seed,
            **opts,
        )
    inputs = {"seed": seed, **{f"expert:{n}": p for n, p in experts.items()}}
    with tracked(
        tracking,
        "upcycle" if kind != "extend" else "extend",
        f"build-{kind}",
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
                run,
                path,
                kind in FINAL_BUILDS,
                tracking,
                register_as=(tracking or {}).get("register", {}).get(f"build-{kind}"),
            )
    return str(path)


@task(name="remove_expert", task_run_name="remove-{domain}", **CACHED)
def remove_domain_expert(
    moe: str, domain: str, out_dir: str, metadata: dict | None = None, tracking: dict | None = None
) -> dict:
    """Drop `domain`'s routed expert from the MoE `moe` (nexus.upcycling.remove_expert); returns
    `{checkpoint, registered}` (registered: {name, version} or None)."""
    from nexus.checkpoint import load_checkpoint, save_checkpoint
    from nexus.upcycling import remove_expert

    model = remove_expert(load_checkpoint(moe), domain)
    with tracked(tracking, "remove", f"remove-{domain}", {"remove": domain}, {"moe": moe}) as run:
        path = save_checkpoint(
            model,
            out_dir,
            metadata={**(metadata or {}), "built": "remove"},
            extra_files={TOKENIZER_FILE: Path(moe) / TOKENIZER_FILE},
        )
        version = (
            run.log_checkpoint(path, register_as=(tracking or {}).get("register", {}).get(f"remove-{domain}"))
            if run is not None
            else None
        )
    return {
        "checkpoint": str(path),
        "registered": {"name": version.name, "version": str(version.version)} if version else None,
    }


@task(task_run_name="evaluate", **CACHED)
def evaluate_models(
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
