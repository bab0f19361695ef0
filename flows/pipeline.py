"""`upcycle_pipeline`: [seed pretraining] -> dense experts in parallel -> domain embeddings ->
upcycle into the Nexus MoE and the selected baselines -> MoE training -> evaluation -> summary.

The expert phase is a subflow run on the task runner chosen by `runner.*` (threads, Dask, Ray).
Everything else is a task over the library (see flows.tasks), cached on its inputs.

Placement (flows/placement.py): with GPUs, each training task asks the runner for its stage's
`devices` GPUs (Dask resources / Ray `num_gpus`) and leases them on its machine, so parallel experts
get GPUs of their own; MoE trainings that would not fit on the GPUs together run one after another.
A multi-device stage runs as its own processes (`nexus.training.launch`), never as a re-run of this
flow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows import names
from flows.artifacts import publish
from flows.config import Experiment, PipelineConfig, as_dict, compose
from flows.contracts import PreparedData, StageSpec, TrackingSettings
from flows.models import domain_record, line_name
from flows.placement import parallel_stages, resource_annotations, visible_gpus
from flows.report import write_pipeline_report
from flows.runners import make_runner
from flows.stages import configured_stages, stage_spec
from flows.tasks import build_model, embed_domain, evaluate_models, prepare_data, submit, train_stage
from nexus.errors import ConfigError
from nexus.model.routers import get_router, router_names
from nexus.training.config import TrainConfig

Router = Literal[router_names()]  # type: ignore[valid-type]
"""A registered router kind (nexus.model.routers; a choice in the Prefect UI's run form)."""


def knob_overrides(**knobs: Any) -> list[str]:
    """Typed flow parameters (the Prefect UI form) as Hydra overrides; None means 'keep'."""
    keys = {
        "routers": "router.routers",
        "expert_steps": "train.expert.max_steps",
        "moe_steps": "train.moe.max_steps",
        "seed_steps": "train.seed.max_steps",
        "finetune_steps": "train.extension.max_steps",
        "out_dir": "out_dir",
        "runner": "runner.kind",
    }
    out = []
    for name, value in knobs.items():
        if value is not None:
            out.append(f"{keys[name]}={json.dumps(value) if isinstance(value, list) else value}")
    return out


def tracking_context(cfg: PipelineConfig, run_name: str):
    """The MLflow parent run (yields its id), or a null context yielding None."""
    if not cfg.tracking.enabled:
        return nullcontext(None)
    from flows.tracking import configure, pipeline_run

    configure(cfg.tracking.uri)
    return pipeline_run(
        cfg.tracking.experiment,
        run_name,
        config=as_dict(cfg),
        attempt_key=f"{run_name}@{Path(cfg.out_dir).resolve()}",
    )


def stage_tracking(
    cfg: PipelineConfig, parent: str | None, register: dict[str, str] | None = None
) -> TrackingSettings | None:
    """What the stage tasks under the parent run `parent` log with (None when tracking is off): the
    store, the parent, the registered model name per stage label (`register`), and whether intermediate
    checkpoints are uploaded (`tracking.upload_checkpoints`)."""
    if parent is None:
        return None
    return TrackingSettings(
        uri=cfg.tracking.uri,
        parent_run_id=parent,
        register=dict(register or {}),
        upload_checkpoints=cfg.tracking.upload_checkpoints,
    )


def save_config(cfg: PipelineConfig, out_dir: str | Path) -> Path:
    """The resolved config as `<out_dir>/config.yaml` (`nexus.io.atomic_write_text`): what produced the
    outputs next to it. Load it back with `OmegaConf.load` (its keys are `PipelineConfig`'s)."""
    from omegaconf import OmegaConf

    from nexus.io import atomic_write_text

    path = Path(out_dir) / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))))
    return path


def states_of(futures: dict[str, Any]) -> dict[str, str]:
    return {name: fut.state.name for name, fut in futures.items()}


def placement_of(cfg: PipelineConfig) -> dict:
    """What tasks need to place stages: runner kind, GPUs per machine, stages per GPU. On Dask/Ray, a
    stage asking for more GPUs than a machine has is refused here: its task would wait forever for a
    worker (in threads, the GPU lease refuses it when the stage starts)."""
    gpus = cfg.runner.gpus if cfg.runner.gpus is not None else len(visible_gpus())
    for stage in configured_stages():
        devices = stage.train_config(cfg).num_devices
        if cfg.runner.kind in ("dask", "ray") and gpus and devices > gpus:
            raise ConfigError(
                f"train.{stage.name}.devices={devices}: more GPUs than a machine has (runner.gpus={gpus})"
            )
    return {"kind": cfg.runner.kind, "gpus": gpus, "stages_per_gpu": cfg.runner.stages_per_gpu}


def gpus_of(train: TrainConfig, placement: dict | None) -> int:
    """GPUs a stage asks the runner for: its devices, when there are GPUs to place it on."""
    return train.num_devices if (placement or {}).get("gpus") else 0


@flow(name="expert_phase")
def expert_phase(
    experts: dict[str, StageSpec],
    data: PreparedData,
    torch_threads: int = 0,
    tracking: TrackingSettings | None = None,
    placement: dict | None = None,
) -> dict:
    """Phase 1: the experts (`experts`: domain -> its stage) and one domain embedding per domain, all
    submitted at once to the flow's task runner (each expert asking for its GPUs, `placement`)."""
    devices = max((gpus_of(spec.train, placement) for spec in experts.values()), default=0)
    with resource_annotations((placement or {}).get("kind", "threads"), devices):
        trained = {
            d: submit(
                train_stage, spec=spec, torch_threads=torch_threads, tracking=tracking, placement=placement
            )
            for d, spec in experts.items()
        }
    embeds = {
        d: submit(
            embed_domain,
            data_dir=data.dir,
            embedding=data.embedding,
            domain=d,
            data_fp=data.fingerprints[d],
        )
        for d in data.domains
    }
    return {
        "experts": {d: f.result() for d, f in trained.items()},
        "embeddings": {d: f.result() for d, f in embeds.items()},
        "states": {
            **{names.state("expert", d): f.state.name for d, f in trained.items()},
            **{names.state("embed", d): f.state.name for d, f in embeds.items()},
        },
    }


@flow(name="upcycle_pipeline")
def upcycle_pipeline(
    experiment: Experiment = "demo",
    overrides: list[str] | None = None,
    routers: list[Router] | None = None,
    expert_steps: int | None = None,
    moe_steps: int | None = None,
    out_dir: str | None = None,
) -> dict:
    """Train a seed and one expert per domain, upcycle them into MoEs, train and evaluate them.

    Returns the summary (also written to `<out_dir>/summary.json` and logged to MLflow).

    Args:
        experiment: The experiment config (conf/experiment/): `demo`, `micro` (seconds), `small`, ...
        overrides: Hydra `key=value` overrides of the experiment config, e.g. `train.moe.max_steps=500`.
        routers: The MoEs to build (default: the experiment's `router.routers`).
        expert_steps: Training steps of each dense expert (default: the experiment's).
        moe_steps: Training steps of each MoE (default: the experiment's).
        out_dir: Output folder, relative to the project home (default: `outputs/<experiment>`).
    """
    cfg = compose(
        experiment,
        [
            *(overrides or []),
            *knob_overrides(routers=routers, expert_steps=expert_steps, moe_steps=moe_steps, out_dir=out_dir),
        ],
    )
    return run_pipeline(cfg)


def run_pipeline(cfg: PipelineConfig) -> dict:
    log = get_run_logger()
    out = Path(cfg.out_dir).resolve()
    start = time.time()
    save_config(cfg, out)
    with tracking_context(cfg, "upcycle_pipeline") as parent:
        track = stage_tracking(cfg, parent)
        placement = placement_of(cfg)
        data = prepare_data.submit(
            data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(out / "data")
        ).result()
        domains = data.domains
        check_inputs_against_data(cfg, data)
        if track:
            track = track.registering(registry_names(cfg, domains))
        meta = {"data_dir": data.dir, "experiment": cfg.name, "domains": domains}
        futures: dict[str, Any] = {}
        if cfg.seed_checkpoint:
            seed = str(Path(cfg.seed_checkpoint).resolve())
        else:
            model = as_dict(dataclasses.replace(cfg.model, vocab_size=data.vocab_size, moe=None))
            spec = stage_spec(
                "seed", names.SEED, cfg, data, str(out / "seed"), domains=cfg.data.seed_domains, model=model
            )
            futures[names.SEED] = submit(
                train_stage, spec=spec, torch_threads=cfg.torch_threads, tracking=track, placement=placement
            )
            seed = futures[names.SEED].result().checkpoint
        meta["seed_checkpoint"] = seed
        log.info("seed: %s; training %d experts on runner %r", seed, len(domains), cfg.runner.kind)
        if cfg.router.continued_seed:
            futures[names.SEED_CONTINUED_RUN] = continued_seed(cfg, data, seed, out, meta, track, placement)
        expert_specs = {
            d: stage_spec("expert", d, cfg, data, str(out / "experts" / d), domain=d, init_checkpoint=seed)
            for d in domains
        }
        phase = expert_phase.with_options(task_runner=make_runner(**as_dict(cfg.runner)))(
            expert_specs, data, cfg.torch_threads, track, placement
        )
        experts = {d: r.checkpoint for d, r in phase["experts"].items()}

        meta = {
            **meta,
            "domain_data": {
                d: domain_record(data.dir, data.fingerprints[d], phase["embeddings"][d]) for d in domains
            },
        }
        builds, trained = moe_phase(
            cfg, data, seed, experts, phase["embeddings"], out, meta, track, placement
        )
        lines = {k: start_line(f.result().registered) for k, f in trained.items() if f.result().registered}
        checkpoints = {
            names.SEED: seed,
            **{names.expert(d): p for d, p in experts.items()},
            **(
                {names.SEED_CONTINUED: futures[names.SEED_CONTINUED_RUN].result().checkpoint}
                if names.SEED_CONTINUED_RUN in futures
                else {}
            ),
            **({names.DENSE_MERGE: builds[names.MERGE].result()} if names.MERGE in builds else {}),
            **{names.moe(k): f.result().checkpoint for k, f in trained.items()},
        }
        futures.update(
            {names.build(k): f for k, f in builds.items()},
            **{names.state("moe", k): f for k, f in trained.items()},
        )
        futures[names.EVALUATE] = evaluation(
            cfg, checkpoints, dict.fromkeys(domains, data.dir), device=cfg.eval.device
        )
        results = futures[names.EVALUATE].result()
        if parent:
            record_evaluation(parent, checkpoints, results, lines)
        summary = {
            "experiment": cfg.name,
            "out_dir": str(out),
            "domains": domains,
            "checkpoints": checkpoints,
            **results,
            "states": {**states_of(futures), **phase["states"]},
            "mlflow": {
                "tracking_uri": cfg.tracking.uri,
                "experiment": cfg.tracking.experiment,
                "parent_run_id": parent,
                "model_name": cfg.tracking.model_name,
                "lines": lines,
            },
            "seconds": round(time.time() - start, 1),
        }
        write_summary(summary, out / "summary.json", parent)
        write_pipeline_report(summary)
        if parent:
            from flows.mlflow_models import log_figures

            log_figures(parent, out / "report" / "figures")
        publish(
            "pipeline",
            cfg.name,
            f"upcycle_pipeline: {cfg.name}",
            {
                "output folder": f"`{out}`",
                "domains": ", ".join(domains),
                "seconds": summary["seconds"],
                **{
                    f"model line {ln['name']}": ", ".join(
                        f"@{a} = v{v}" for a, v in sorted(ln["aliases"].items())
                    )
                    for ln in lines.values()
                },
            },
            results["perplexity"],
            cfg.tracking.uri if parent else None,
            parent,
            list(lines.values()),
        )
    log.info("pipeline finished in %.0f s; summary: %s", summary["seconds"], out / "summary.json")
    return summary


def evaluation(cfg: PipelineConfig, checkpoints: dict[str, str], splits: dict[str, str], **options: Any):
    """`evaluate_models` (submitted) of `checkpoints` ({label: checkpoint}) on `splits` ({domain:
    prepared data dir}) with the config's `eval` settings; `options`: further keywords of the task."""
    return evaluate_models.submit(
        checkpoints=checkpoints,
        splits=splits,
        split=cfg.eval.split,
        batch_size=cfg.eval.batch_size,
        max_tokens=cfg.eval.max_tokens,
        torch_threads=cfg.torch_threads,
        **options,
    )


def moe_phase(
    cfg: PipelineConfig,
    data: PreparedData,
    seed: str,
    experts: dict[str, str],
    embeddings: dict[str, str],
    out: Path,
    meta: dict,
    track: TrackingSettings | None,
    placement: dict | None = None,
) -> tuple[dict, dict]:
    """Phase 2: upcycle (one MoE per router, plus the sparse-upcycling and dense-merge baselines), then
    train every MoE on the data config's MoE mix, at once, or one after another when they would not
    fit on the GPUs together. Returns the futures (builds, trained MoEs), keyed by kind."""
    kinds = list(cfg.router.routers) + (["sparse"] if cfg.router.sparse_upcycling else [])
    builds = {
        k: submit(
            build_model,
            kind=k,
            out_dir=str(out / "upcycled" / k),
            seed=seed,
            experts=experts,
            embeddings=embeddings,
            moe_options=cfg.router.moe_kwargs(),
            metadata=meta,
            init_seed=cfg.router.init_seed,
            tracking=track,
        )
        for k in kinds
    }
    if cfg.router.dense_merge:
        builds[names.MERGE] = submit(
            build_model,
            kind=names.MERGE,
            out_dir=str(out / "merged"),
            seed=seed,
            experts=experts,
            metadata=meta,
            tracking=track,
        )
    placement = placement or {}
    at_once = parallel_stages(
        cfg.train.moe.num_devices, placement.get("gpus", 0), placement.get("stages_per_gpu", 1)
    )
    trained: dict[str, Any] = {}
    for i, k in enumerate(kinds):
        earlier = [trained[kinds[i - at_once]]] if at_once is not None and i >= at_once else []
        spec = stage_spec(
            "moe",
            k,
            cfg,
            data,
            str(out / "moe" / k),
            val_domains=data.domains,
            init_checkpoint=builds[k].result(),
            metadata=meta,
        )
        trained[k] = submit(
            train_stage,
            spec=spec,
            torch_threads=cfg.torch_threads,
            tracking=track,
            placement=placement,
            wait_for=earlier,
        )
    return builds, trained


def continued_seed(
    cfg: PipelineConfig,
    data: PreparedData,
    seed: str,
    out: Path,
    meta: dict,
    track: TrackingSettings | None,
    placement: dict | None = None,
):
    """The data-matched dense baseline (stage `seed-continued`): the seed trained further on the MoE mix
    (`flows.stages.continued_seed_train`)."""
    spec = stage_spec(
        names.SEED_CONTINUED_RUN,
        names.SEED_CONTINUED_RUN,
        cfg,
        data,
        str(out / "seed-continued"),
        val_domains=data.domains,
        init_checkpoint=seed,
        metadata=meta,
    )
    return submit(
        train_stage, spec=spec, torch_threads=cfg.torch_threads, tracking=track, placement=placement
    )


def check_inputs_against_data(cfg: PipelineConfig, data: PreparedData) -> None:
    """Before any training: a given seed must use the data's tokenizer, and the embedder must load."""
    from nexus.data import load_embedder

    if cfg.seed_checkpoint:
        seed_tok = Path(cfg.seed_checkpoint) / "tokenizer.json"
        if seed_tok.read_bytes() != Path(data.tokenizer).read_bytes():
            raise ConfigError(
                f"seed_checkpoint: {seed_tok} differs from the data's tokenizer {data.tokenizer}"
            )
        vocab = json.loads((Path(cfg.seed_checkpoint) / "config.json").read_text())["model"]["vocab_size"]
        if vocab != data.vocab_size:
            raise ConfigError(
                f"seed_checkpoint: vocab_size {vocab} differs from the data's tokenizer ({data.vocab_size})"
            )
    if any(get_router(r).uses_domain_embeddings for r in cfg.router.routers):
        load_embedder(
            cfg.data.embedding.model or "default"
        )  # DataError naming the embedder if it cannot load


def registry_names(cfg: PipelineConfig, domains: list[str]) -> dict[str, str]:
    """Registered model name per stage: each router's MoE starts a model line (`flows.models.line_name`;
    extensions and removals register its next versions); the seed, each expert and the merge get their own."""
    return {
        **{r: line_name(cfg.tracking.model_name, r) for r in cfg.router.routers},
        names.SEED: names.registered_name(cfg.name, "seed"),
        names.SEED_CONTINUED_RUN: names.registered_name(cfg.name, "seed-continued"),
        names.build(names.MERGE): names.registered_name(cfg.name, "merged"),
        **{d: names.registered_name(cfg.name, f"expert-{d}") for d in domains},
    }


def record_evaluation(
    parent: str, checkpoints: dict[str, str], results: dict, lines: dict[str, dict]
) -> None:
    """The evaluation in MLflow (metrics on the parent run, every evaluated model and its run; routing
    tables) and each new MoE version's description."""
    from flows.mlflow_models import describe_version, log_evaluation

    log_evaluation(parent, checkpoints, results)
    for kind, line in lines.items():
        describe_version(
            line["name"],
            line["version"],
            results["perplexity"][names.moe(kind)],
            f"The {kind}-router MoE upcycled from the seed and the experts "
            f"{', '.join(d for d in results['perplexity'][names.moe(kind)])}, then trained on their mix.",
        )


def start_line(registered: dict) -> dict:
    """A freshly trained MoE version: `candidate`, and `champion` when its line has none yet (the first
    upcycled MoE starts the line). A version marked before (a cached rerun) is left as it is."""
    from mlflow import MlflowClient

    from flows.models import TAG_GATE, champion_version, line_aliases, mark_version

    client = MlflowClient()
    name, version = registered["name"], registered["version"]
    if TAG_GATE not in client.get_model_version(name, version).tags:
        mark_version(
            name, version, promote=champion_version(name, client) is None, gate="initial", client=client
        )
    return {"name": name, "version": version, "aliases": line_aliases(name, client)}


def write_summary(summary: dict, path: Path, parent_run_id: str | None) -> None:
    from nexus.io import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=1, default=str))
    if parent_run_id:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(parent_run_id, str(path))
