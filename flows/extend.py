"""`extend_with_expert`: add a new domain's expert to a trained MoE (paper §3, phase 3), and
`extend_from_inbox`, the scheduled flow that extends the latest registered MoE with every new
domain folder found in an inbox.

Steps: train the new dense expert from the seed -> embed the new domain -> `nexus.upcycling.extend`
-> finetune on the new/previous 50/50 mix -> evaluate before/after -> register the extended MoE as
the registered model's next version.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, as_dict, check_domain_folder, compose
from flows.pipeline import knob_overrides, registry_names, states_of, tracking_context, write_summary
from flows.tasks import TOKENIZER_FILE, build_model, embed_domain, evaluate_models, prepare_data, submit, train_stage
from nexus.checkpoint import read_checkpoint_config
from nexus.data.cache import fingerprint as hash_json
from nexus.errors import ConfigError


def resolve_moe(ref: str | None, cfg: PipelineConfig, dest: Path) -> tuple[str, str | None]:
    """A checkpoint directory for `ref`: a path, `models:/<name>/<version>`, a registered model name,
    or None (the latest version of `tracking.model_name`). Returns (path, registered version)."""
    if ref and Path(ref).is_dir():
        return str(Path(ref).resolve()), None
    import mlflow
    from mlflow import MlflowClient

    from flows.tracking import configure

    configure(cfg.tracking.uri)
    name, _, version = (ref or cfg.tracking.model_name).removeprefix("models:/").partition("/")
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ConfigError(f"moe: {ref or name!r} is neither a checkpoint directory nor a registered model "
                          f"in {cfg.tracking.uri}")
    mv = max(versions, key=lambda v: int(v.version)) if not version else client.get_model_version(name, version)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dest / f"v{mv.version}")))
    return str(path), str(mv.version)


@flow(name="extend_with_expert")
def extend_with_expert(experiment: str = "demo", overrides: list[str] | None = None, moe: str | None = None,
                       domain: str = "code", domain_folder: str | None = None,
                       finetune_steps: int | None = None, expert_steps: int | None = None,
                       tag: str | None = None) -> dict:
    """Extend `moe` (path / `models:/name/version` / None: the latest registered) with `domain`, read
    from `domain_folder` (text/JSONL files) or, without a folder, from the experiment's preset.
    `tag`: a name for this extension's outputs (`extensions/<domain>/<tag>/`)."""
    cfg = compose(experiment, [*(overrides or []), *knob_overrides(finetune_steps=finetune_steps,
                                                                    expert_steps=expert_steps)])
    if domain_folder:
        check_domain_folder(domain_folder, "domain_folder")
    return run_extension(cfg, moe, domain, domain_folder, tag)


def check_embedder(cfg: PipelineConfig, moe: dict, domain: str) -> None:
    """A Nexus router reads domain embeddings of one size: fail before training the new expert if the
    configured embedder produces another (e.g. a different model than the MoE was built with)."""
    if moe["router"] != "nexus":
        return
    from nexus.data import check_embedding_dim, load_embedder

    embedder = load_embedder(cfg.data.embedding_model)
    check_embedding_dim([0.0] * embedder.dim, moe["domain_embed_dim"], domain, f"embedder {embedder.name}")


def run_extension(cfg: PipelineConfig, moe_ref: str | None, domain: str, folder: str | None,
                  tag: str | None = None) -> dict:
    """`tag` names this extension's own folder under `extensions/<domain>/` (several extensions of one
    domain, e.g. other MoEs or budgets, share the new expert and its data)."""
    log = get_run_logger()
    shared = Path(cfg.out_dir).resolve() / "extensions" / domain
    out = shared / tag if tag else shared
    with tracking_context(cfg, f"extend_with_expert:{domain}" + (f":{tag}" if tag else "")) as parent:
        moe, version = resolve_moe(moe_ref, cfg, out / "input")
        info = read_checkpoint_config(moe)
        meta, names = info["metadata"], info["model"]["moe"]["expert_names"]
        if domain in names:
            raise ConfigError(f"domain {domain!r}: the MoE already has an expert of that name ({names})")
        check_embedder(cfg, info["model"]["moe"], domain)
        registered_as = registry_names(cfg, [domain])[info["model"]["moe"]["router"]]
        track = {"uri": cfg.tracking.uri, "parent_run_id": parent,
                 "register": {f"extended-{domain}": registered_as, domain: f"nexus-{cfg.name}-expert-{domain}"}
                 } if parent else None
        new = prepare_data.submit(as_dict(cfg.data), f"{cfg.name}-{domain}", str(shared / "data"),
                                  keep=[] if folder else [domain], extra={domain: folder} if folder else None,
                                  tokenizer_path=str(Path(moe) / TOKENIZER_FILE)).result()
        fp = new["fingerprints"][domain]
        futures = {"expert": submit(train_stage,
            "expert", domain, as_dict(cfg.train.expert), new["dir"], {domain: 1.0}, str(shared / "expert"),
            hash_json([fp]), init_checkpoint=meta["seed_checkpoint"], val_domains=[domain],
            torch_threads=cfg.torch_threads, tracking=track),
            "embed": submit(embed_domain, new["dir"], new["config"]["embedding"], domain, fp)}
        expert = futures["expert"].result()["checkpoint"]
        futures["build-extend"] = submit(build_model,
            "extend", str(out / "extended"), meta["seed_checkpoint"], {"moe": moe, domain: expert},
            {domain: futures["embed"].result()}, metadata={**meta, "domains": [*names, domain]},
            init_seed=cfg.router.init_seed, tracking=track)
        weights = _extension_weights(meta["data_dir"], names, new, domain)
        futures["finetune"] = submit(train_stage,
            "extension", f"extended-{domain}", as_dict(cfg.train.extension), meta["data_dir"], weights,
            str(out / "finetuned"), hash_json([fp, weights]), init_checkpoint=futures["build-extend"].result(),
            val_domains=[*names, domain], extra_dirs={domain: new["dir"]},
            metadata={**meta, "domains": [*names, domain]}, torch_threads=cfg.torch_threads, tracking=track)
        extended = futures["finetune"].result()["checkpoint"]
        futures["evaluate"] = evaluate_models.submit(
            {"before": moe, f"expert:{domain}": expert, "appended": futures["build-extend"].result(), "after": extended},
            {**{d: meta["data_dir"] for d in names}, domain: new["dir"]}, cfg.eval.split, cfg.eval.batch_size,
            cfg.eval.max_tokens, cfg.torch_threads)
        registered = _latest_version(registered_as) if parent else None
        summary = {"domain": domain, "tag": tag, "router": info["model"]["moe"]["router"], "moe": moe,
                   "moe_version": version, "extended": extended, "finetune_steps": cfg.train.extension.max_steps,
                   "registered_version": registered, **futures["evaluate"].result(), "states": states_of(futures)}
        write_summary(summary, out / "summary.json", parent)
    log.info("extended %s with %r -> %s (registered version %s)", moe, domain, extended, registered)
    return summary


def _extension_weights(data_dir: str, previous: list[str], new: dict, domain: str) -> dict[str, float]:
    from nexus.data import MixtureConfig, open_prepared, stage_weights

    counts = {**{d: n for d, n in open_prepared(data_dir).token_counts().items() if d in previous},
              domain: new["token_counts"][domain]}
    return stage_weights("extension", counts, previous, MixtureConfig(**new["config"]["mixture"]), domain=domain)


def _latest_version(name: str) -> str | None:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    return str(max(int(v.version) for v in versions)) if versions else None


@flow(name="extend_from_inbox")
def extend_from_inbox(experiment: str = "demo", overrides: list[str] | None = None, inbox: str | None = None) -> dict:
    """Extend the latest registered MoE with every inbox subfolder (one per new domain) it has no
    expert for, one after another; a quick no-op when there is nothing new."""
    log = get_run_logger()
    cfg = compose(experiment, overrides or [])
    folder = Path(inbox or cfg.extension.inbox)
    candidates = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    have: list[str] = []
    if candidates:
        moe, _ = resolve_moe(None, cfg, Path(cfg.out_dir).resolve() / "inbox-check")
        have = read_checkpoint_config(moe)["model"]["moe"]["expert_names"]
    new = [d for d in candidates if d not in have]
    if not new:
        log.info("inbox %s: no new domains (have %s); nothing to do", folder, have or "none")
        return {"inbox": str(folder), "extended": [], "versions": []}
    for d in new:  # every new folder is checked before any training starts
        check_domain_folder(str(folder / d), f"inbox domain {d!r}")
    log.info("inbox %s: extending the MoE (experts %s) with %s", folder, have, new)
    results = [extend_with_expert(experiment, overrides, None, d, str(folder / d)) for d in new]
    return {"inbox": str(folder), "extended": new, "versions": [r["registered_version"] for r in results]}
