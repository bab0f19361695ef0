"""`extend_with_expert`: add a new domain's expert to an MoE of a model line (paper §3, phase 3), and
`extend_from_inbox`, the scheduled flow that extends the line's champion with every new domain
folder found in an inbox, one round each.

A round: check every input (writing nothing) -> take the model line's lock -> train the new dense
expert from the seed -> embed the new domain -> `nexus.upcycling.extend` -> finetune on the new
domain mixed with every domain the MoE already serves (initial or added by an earlier round) ->
evaluate the base, the new expert, the appended and the finetuned MoE on every domain -> promotion
gate -> the result is the line's next version (`candidate`; `champion` when the gate passed and it
was built on the champion). See flows/models.py for model lines and references.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import names
from flows.config import Experiment, PipelineConfig, as_dict, compose
from flows.contracts import StageSpec
from flows.models import (
    domain_record,
    fetch_checkpoint,
    is_path_ref,
    lock_dir,
    model_line_lock,
    versions_built_on,
)
from flows.pipeline import (
    evaluation,
    knob_overrides,
    save_config,
    stage_tracking,
    states_of,
    tracking_context,
    write_summary,
)
from flows.recipes import divergence_metrics, finetune_stages, fit_router, recipe_of
from flows.rounds import (
    ExtensionPlan,
    check_embedder,
    check_new_domain,
    extension_weights,
    judge,
    plan_extension,
    publish_round,
    resolve_base,
)
from flows.stages import stage_spec
from flows.tasks import build_model, embed_domain, prepare_data, submit, train_stage
from nexus.data.cache import fingerprint as hash_json


@flow(name="extend_with_expert")
def extend_with_expert(
    experiment: Experiment = "demo",
    overrides: list[str] | None = None,
    moe: str | None = None,
    domain: str = "code",
    domain_folder: str | None = None,
    finetune_steps: int | None = None,
    expert_steps: int | None = None,
    tag: str | None = None,
) -> dict:
    """Add an expert for a new domain to an MoE, finetune, evaluate, and register the next version.

    Args:
        experiment: The experiment config (conf/experiment/) the MoE belongs to.
        overrides: Hydra `key=value` overrides, e.g. `extension.gate_tolerance=0.1`.
        moe: The MoE to extend: a checkpoint folder, `models:/<name>/<version>`, `models:/<name>@<alias>`
            or a registered name; empty: the model line's `@champion`.
        domain: The new domain's name (letters, digits, `_.-`; at most 64 characters).
        domain_folder: Folder of .txt/.md/.jsonl files of the new domain; empty: a held-out domain of the
            experiment's preset (e.g. `code` in the demo).
        finetune_steps: Finetuning steps after appending the expert (default: the experiment's).
        expert_steps: Training steps of the new dense expert (default: the experiment's).
        tag: A name for this extension's own output folder (`extensions/<domain>/<tag>/`).
    """
    cfg = compose(
        experiment,
        [*(overrides or []), *knob_overrides(finetune_steps=finetune_steps, expert_steps=expert_steps)],
    )
    if tag is not None:
        from nexus.data import check_domain_name

        check_domain_name(tag)  # a path component, like the domain
    return run_extension(cfg, plan_extension(cfg, moe, domain, domain_folder), tag)


def run_extension(cfg: PipelineConfig, plan: ExtensionPlan, tag: str | None = None) -> dict:
    """`tag` names this extension's own folder under `extensions/<domain>/` (several extensions of one
    domain, e.g. other MoEs or budgets, share the new expert and its data)."""
    log = get_run_logger()
    domain = plan.domain
    shared = Path(cfg.out_dir).resolve() / "extensions" / domain
    out = shared / tag if tag else shared
    save_config(cfg, out)
    with model_line_lock(lock_dir(cfg.tracking.uri, cfg.out_dir), plan.line) as waited:
        if not is_path_ref(plan.base.ref):  # the alias may have moved while another run held the line
            base, line, earlier = resolve_base(cfg, plan.base.ref, domain)
            plan = ExtensionPlan(domain, plan.folder, base, line, earlier)
        log.info(
            "extending %s (experts %s) with %r%s",
            plan.base.label,
            plan.base.moe["expert_names"],
            domain,
            f" after waiting {waited:.0f} s for the model line" if waited > 1 else "",
        )
        with tracking_context(cfg, f"extend_with_expert:{domain}" + (f":{tag}" if tag else "")) as parent:
            summary = _extend(cfg, plan, shared, out, parent, tag)
            summary["line"]["waited_seconds"] = round(waited, 1)
            write_summary(summary, out / "summary.json", parent)
            publish_round(cfg, f"extension of {plan.base.label} with {domain!r}", summary, parent)
    log.info(
        "extended %s with %r -> %s (registered %s)",
        plan.base.label,
        domain,
        summary["extended"],
        summary["registered"] or "nothing: tracking is off",
    )
    return summary


def _extend(
    cfg: PipelineConfig, plan: ExtensionPlan, shared: Path, out: Path, parent: str | None, tag: str | None
) -> dict:
    log = get_run_logger()
    domain, base = plan.domain, plan.base
    moe = fetch_checkpoint(base, Path(cfg.out_dir).resolve() / "models")
    meta, served = base.config["metadata"], base.moe["expert_names"]
    track = stage_tracking(
        cfg,
        parent,
        {names.extended(domain): plan.line, domain: names.registered_name(cfg.name, f"expert-{domain}")},
    )
    new = prepare_data.submit(
        data=as_dict(cfg.data),
        experiment=f"{cfg.name}-{domain}",
        out_dir=str(shared / "data"),
        keep=[] if plan.folder else [domain],
        extra={domain: plan.folder} if plan.folder else None,
        tokenizer_path=str(Path(moe) / "tokenizer.json"),
    ).result()
    fp = new.fingerprints[domain]
    expert_spec = stage_spec(
        "expert",
        domain,
        cfg,
        new,
        str(shared / "expert"),
        domain=domain,
        init_checkpoint=meta["seed_checkpoint"],
    )
    futures = {
        "expert": submit(train_stage, spec=expert_spec, torch_threads=cfg.torch_threads, tracking=track),
        "embed": submit(embed_domain, data_dir=new.dir, embedding=new.embedding, domain=domain, data_fp=fp),
    }
    expert = futures["expert"].result().checkpoint
    records = {**plan.earlier, domain: domain_record(new.dir, fp, futures["embed"].result())}
    metadata = {**meta, "domains": [*served, domain], "domain_data": records, "base": base.describe()}
    futures[names.build("extend")] = submit(
        build_model,
        kind="extend",
        out_dir=str(out / "extended"),
        seed=meta["seed_checkpoint"],
        experts={domain: expert},
        embeddings={domain: futures["embed"].result()},
        moe=moe,
        lam=cfg.extension.lam,
        metadata=metadata,
        init_seed=cfg.router.init_seed,
        extend_options={"linear_router": cfg.extension.linear_router},
        tracking=track,
    )
    dirs = {d: r["data_dir"] for d, r in records.items()}
    appended = futures[names.build("extend")].result()
    if cfg.extension.router_init == "data":
        futures["fit-router"] = submit(
            fit_router,
            checkpoint=appended,
            out_dir=str(out / "router-fit"),
            domain=domain,
            dirs=dirs,
            steps=cfg.extension.router_fit_steps,
            seed=cfg.train.extension.seed,
            metadata=metadata,
            tracking=track,
        )
        appended = futures["fit-router"].result()["checkpoint"]
    weights = extension_weights(plan.earlier, new, domain, cfg.extension.new_share)
    init, finetuned = appended, None
    for stage, train in finetune_stages(cfg, domain):
        spec = StageSpec(
            stage="extension",
            name=names.extended(domain) if stage == "finetune" else f"{stage}-{domain}",
            train=train,
            data_dir=new.dir,
            weights=weights,
            out_dir=str(out / ("finetuned" if stage == "finetune" else stage)),
            data_fp=hash_json([[r["fingerprint"] for r in records.values()], weights]),
            init_checkpoint=init,
            val_domains=list(records),
            extra_dirs=dirs,
            metadata=metadata,
        )
        futures[stage] = submit(train_stage, spec=spec, torch_threads=cfg.torch_threads, tracking=track)
        finetuned = futures[stage].result()
        init = finetuned.checkpoint
    evaluated = {
        names.BEFORE: moe,
        names.expert(domain): expert,
        names.APPENDED: appended,
        names.AFTER: finetuned.checkpoint,
    }
    # the base and the new expert once per domain (cached), whatever the recipe or budget
    futures["evaluate-base"] = evaluation(
        cfg, {k: evaluated[k] for k in (names.BEFORE, names.expert(domain))}, dirs
    )
    futures[names.EVALUATE] = evaluation(cfg, {k: evaluated[k] for k in (names.APPENDED, names.AFTER)}, dirs)
    results = merge_evaluations(futures["evaluate-base"].result(), futures[names.EVALUATE].result())
    if cfg.eval.divergence_prompts:
        futures["divergence"] = divergence_metrics.submit(
            reference=moe,
            models={names.APPENDED: appended, names.AFTER: finetuned.checkpoint},
            splits=dict(plan_dirs(plan)),
            split=cfg.eval.split,
            prompts=cfg.eval.divergence_prompts,
            prompt_len=cfg.eval.divergence_prompt_len,
            new_tokens=cfg.eval.divergence_new_tokens,
            torch_threads=cfg.torch_threads,
        )
        results["divergence"] = futures["divergence"].result()
    gate = judge(cfg, plan.line, base, evaluated, results, domain, finetuned.registered, f"+{domain}", parent)
    log.info("promotion gate of %s + %r:\n%s", base.label, domain, gate["table"])
    return {
        "domain": domain,
        "tag": tag,
        "router": base.moe["router"],
        "moe": moe,
        "moe_version": base.version,
        "base": base.describe(),
        "extended": finetuned.checkpoint,
        "appended_checkpoint": appended,
        "domains": list(records),
        "finetune_weights": weights,
        "finetune_steps": cfg.train.extension.max_steps,
        "recipe": recipe_of(cfg),
        "router_fit": futures["fit-router"].result()["fit"] if "fit-router" in futures else None,
        **gate["summary"],
        **results,
        "states": states_of(futures),
    }


def plan_dirs(plan: ExtensionPlan) -> dict[str, str]:
    """{earlier domain: its prepared data dir}: where the divergence prompts come from."""
    return {d: r["data_dir"] for d, r in plan.earlier.items()}


def merge_evaluations(*parts: dict) -> dict:
    """`evaluate_models` results of disjoint model sets, as one."""
    return {key: {name: value for part in parts for name, value in part[key].items()} for key in parts[0]}


@flow(name="extend_from_inbox")
def extend_from_inbox(
    experiment: Experiment = "demo", overrides: list[str] | None = None, inbox: str | None = None
) -> dict:
    """Extend the model line's champion with every new domain folder of the inbox, one round each.

    Rounds run in name order, each building on the champion of its time. Every folder is checked before
    any training; a domain whose extension of the current champion already failed its gate is not
    retried. A quick no-op when there is nothing new.

    Args:
        experiment: The experiment config (conf/experiment/) the model line belongs to.
        overrides: Hydra `key=value` overrides, e.g. `train.extension.max_steps=100`.
        inbox: The inbox folder, one subfolder of .txt/.md/.jsonl files per new domain (default: the
            experiment's `extension.inbox`, `<out_dir>/inbox`).
    """
    log = get_run_logger()
    cfg = compose(experiment, overrides or [])
    folder = Path(inbox or cfg.extension.inbox)
    candidates = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not candidates:
        log.info("inbox %s: no domain folders; nothing to do", folder)
        return {"inbox": str(folder), "extended": [], "versions": [], "skipped": {}}
    base, line, _ = resolve_base(cfg, None)
    have = base.moe["expert_names"]
    failed = {
        v["change"].removeprefix("+") for v in versions_built_on(line, base.label) if v["gate"] == "failed"
    }
    skipped = {d: f"failed its gate on {base.label}" for d in candidates if d in failed and d not in have}
    new = [d for d in candidates if d not in have and d not in skipped]
    for d, why in skipped.items():
        log.info("inbox %s: %r not retried: its extension of %s %s", folder, d, base.label, why)
    if not new:
        log.info("inbox %s: no new domains (have %s); nothing to do", folder, have)
        return {"inbox": str(folder), "extended": [], "versions": [], "skipped": skipped}
    for d in new:  # every new folder is checked before any training starts
        check_new_domain(cfg, d, str(folder / d))
    check_embedder(cfg, base.moe, new[0])
    log.info("inbox %s: extending %s (experts %s) with %s, one round each", folder, base.label, have, new)
    results = [extend_with_expert(experiment, overrides, None, d, str(folder / d)) for d in new]
    return {
        "inbox": str(folder),
        "extended": new,
        "versions": [r["registered_version"] for r in results],
        "promoted": [r["line"]["promoted"] for r in results],
        "skipped": skipped,
    }
