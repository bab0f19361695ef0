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

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, as_dict, compose
from flows.models import (
    ResolvedModel,
    builds_on_champion,
    domain_record,
    domain_records,
    fetch_checkpoint,
    is_path_ref,
    line_name,
    lock_dir,
    mark_version,
    model_line_lock,
    resolve_model,
    versions_built_on,
)
from flows.pipeline import knob_overrides, states_of, tracking_context, write_summary
from flows.tasks import build_model, embed_domain, evaluate_models, prepare_data, submit, train_stage
from nexus.data.cache import fingerprint as hash_json
from nexus.errors import ConfigError


@dataclass(frozen=True)
class ExtensionPlan:
    """A checked extension: what to add, to which model, and the domains that model already serves."""

    domain: str
    folder: str | None
    base: ResolvedModel
    line: str
    """The registered model (model line) the result becomes a version of."""
    earlier: dict[str, dict]
    """{domain: domain_record} of every domain the base serves."""


def check_new_domain(cfg: PipelineConfig, domain: str, folder: str | None) -> None:
    """The new domain's name (one safe path component) and its documents: a folder read and parsed now,
    or, without a folder, a domain of the experiment's preset."""
    from nexus.data import check_domain_name, check_folder_domain

    check_domain_name(domain)
    if folder:
        splits = cfg.data.to_data_config(cfg.name, str(Path(cfg.out_dir) / "data"), keep=[], extra={domain: folder})
        check_folder_domain(domain, folder, splits.splits)
    elif domain not in _preset_domains(cfg):
        raise ConfigError(f"domain {domain!r}: no folder given and experiment {cfg.name!r} has no domain of that "
                          f"name (it has {sorted(_preset_domains(cfg))})")


def _preset_domains(cfg: PipelineConfig) -> set[str]:
    from nexus.data import preset

    if cfg.data.preset == "none":
        return set(cfg.data.folders)
    data = preset(cfg.data.preset, corpora_dir=cfg.data.corpora_dir) if cfg.data.preset == "tiny" else preset(cfg.data.preset)
    return {d.name for d in data.domains} | set(cfg.data.folders)


def resolve_base(cfg: PipelineConfig, ref: str | None, domain: str | None = None
                 ) -> tuple[ResolvedModel, str, dict[str, dict]]:
    """The model to extend (None: the line's champion) and what it serves; refuses a domain it has."""
    base = resolve_model(ref, cfg.tracking.model_name, cfg.tracking.uri, "moe")
    names = base.moe["expert_names"]
    if domain is not None and domain in names:
        raise ConfigError(f"domain {domain!r}: {base.label} already has an expert of that name ({names})")
    return base, line_name(cfg.tracking.model_name, base.moe["router"]), domain_records(base.config, base.label)


def plan_extension(cfg: PipelineConfig, moe_ref: str | None, domain: str, folder: str | None) -> ExtensionPlan:
    """Check every input of an extension before anything is written (ConfigError/DataError naming it)."""
    check_new_domain(cfg, domain, folder)
    base, line, earlier = resolve_base(cfg, moe_ref, domain)
    check_embedder(cfg, base.moe, domain)
    return ExtensionPlan(domain, folder, base, line, earlier)


@flow(name="extend_with_expert")
def extend_with_expert(experiment: str = "demo", overrides: list[str] | None = None, moe: str | None = None,
                       domain: str = "code", domain_folder: str | None = None,
                       finetune_steps: int | None = None, expert_steps: int | None = None,
                       tag: str | None = None) -> dict:
    """Extend `moe` (a checkpoint directory, `models:/name/version`, `models:/name@alias`, a registered
    name; None: the line's champion) with `domain`, read from `domain_folder` (text/JSONL files) or,
    without a folder, from the experiment's preset. `tag`: a name for this extension's outputs
    (`extensions/<domain>/<tag>/`)."""
    cfg = compose(experiment, [*(overrides or []), *knob_overrides(finetune_steps=finetune_steps,
                                                                    expert_steps=expert_steps)])
    if tag is not None:
        from nexus.data import check_domain_name

        check_domain_name(tag)  # a path component, like the domain
    return run_extension(cfg, plan_extension(cfg, moe, domain, domain_folder), tag)


def check_embedder(cfg: PipelineConfig, moe: dict, domain: str) -> None:
    """A Nexus router reads domain embeddings of one size: fail before training the new expert if the
    configured embedder produces another (e.g. a different model than the MoE was built with)."""
    if moe["router"] != "nexus":
        return
    from nexus.data import check_embedding_dim, load_embedder

    embedder = load_embedder(cfg.data.embedding_model)
    check_embedding_dim([0.0] * embedder.dim, moe["domain_embed_dim"], domain, f"embedder {embedder.name}")


def run_extension(cfg: PipelineConfig, plan: ExtensionPlan, tag: str | None = None) -> dict:
    """`tag` names this extension's own folder under `extensions/<domain>/` (several extensions of one
    domain, e.g. other MoEs or budgets, share the new expert and its data)."""
    log = get_run_logger()
    domain = plan.domain
    shared = Path(cfg.out_dir).resolve() / "extensions" / domain
    out = shared / tag if tag else shared
    with model_line_lock(lock_dir(cfg.tracking.uri, cfg.out_dir), plan.line) as waited:
        if not is_path_ref(plan.base.ref):  # the alias may have moved while another run held the line
            base, line, earlier = resolve_base(cfg, plan.base.ref, domain)
            plan = ExtensionPlan(domain, plan.folder, base, line, earlier)
        log.info("extending %s (experts %s) with %r%s", plan.base.label, plan.base.moe["expert_names"], domain,
                 f" after waiting {waited:.0f} s for the model line" if waited > 1 else "")
        with tracking_context(cfg, f"extend_with_expert:{domain}" + (f":{tag}" if tag else "")) as parent:
            summary = _extend(cfg, plan, shared, out, parent, tag)
            summary["line"]["waited_seconds"] = round(waited, 1)
            write_summary(summary, out / "summary.json", parent)
    log.info("extended %s with %r -> %s (registered %s)", plan.base.label, domain, summary["extended"],
             summary["registered"] or "nothing: tracking is off")
    return summary


def _extend(cfg: PipelineConfig, plan: ExtensionPlan, shared: Path, out: Path, parent: str | None,
            tag: str | None) -> dict:
    log = get_run_logger()
    domain, base = plan.domain, plan.base
    moe = fetch_checkpoint(base, Path(cfg.out_dir).resolve() / "models")
    meta, names = base.config["metadata"], base.moe["expert_names"]
    track = {"uri": cfg.tracking.uri, "parent_run_id": parent,
             "register": {f"extended-{domain}": plan.line, domain: f"nexus-{cfg.name}-expert-{domain}"}
             } if parent else None
    new = prepare_data.submit(as_dict(cfg.data), f"{cfg.name}-{domain}", str(shared / "data"),
                              keep=[] if plan.folder else [domain],
                              extra={domain: plan.folder} if plan.folder else None,
                              tokenizer_path=str(Path(moe) / "tokenizer.json")).result()
    fp = new["fingerprints"][domain]
    futures = {"expert": submit(train_stage,
        "expert", domain, as_dict(cfg.train.expert), new["dir"], {domain: 1.0}, str(shared / "expert"),
        hash_json([fp]), init_checkpoint=meta["seed_checkpoint"], val_domains=[domain],
        torch_threads=cfg.torch_threads, tracking=track),
        "embed": submit(embed_domain, new["dir"], new["config"]["embedding"], domain, fp)}
    expert = futures["expert"].result()["checkpoint"]
    records = {**plan.earlier, domain: domain_record(new["dir"], fp, futures["embed"].result())}
    metadata = {**meta, "domains": [*names, domain], "domain_data": records, "base": base.describe()}
    futures["build-extend"] = submit(build_model,
        "extend", str(out / "extended"), meta["seed_checkpoint"], {"moe": moe, domain: expert},
        {domain: futures["embed"].result()}, metadata=metadata, init_seed=cfg.router.init_seed, tracking=track)
    weights = extension_weights(plan.earlier, new, domain)
    dirs = {d: r["data_dir"] for d, r in records.items()}
    futures["finetune"] = submit(train_stage,
        "extension", f"extended-{domain}", as_dict(cfg.train.extension), new["dir"], weights,
        str(out / "finetuned"), hash_json([[r["fingerprint"] for r in records.values()], weights]),
        init_checkpoint=futures["build-extend"].result(), val_domains=list(records), extra_dirs=dirs,
        metadata=metadata, torch_threads=cfg.torch_threads, tracking=track)
    finetuned = futures["finetune"].result()
    futures["evaluate"] = evaluate_models.submit(
        {"before": moe, f"expert:{domain}": expert, "appended": futures["build-extend"].result(),
         "after": finetuned["checkpoint"]}, dirs, cfg.eval.split, cfg.eval.batch_size, cfg.eval.max_tokens,
        cfg.torch_threads)
    results = futures["evaluate"].result()
    gate = judge(cfg, plan.line, base, results["perplexity"]["before"], results["perplexity"]["after"], domain,
                 finetuned.get("registered"), f"+{domain}", parent)
    log.info("promotion gate of %s + %r:\n%s", base.label, domain, gate["table"])
    return {"domain": domain, "tag": tag, "router": base.moe["router"], "moe": moe,
            "moe_version": base.version, "base": base.describe(), "extended": finetuned["checkpoint"],
            "domains": list(records), "finetune_weights": weights,
            "finetune_steps": cfg.train.extension.max_steps, **gate["summary"], **results,
            "states": states_of(futures)}


def judge(cfg: PipelineConfig, line: str, base: ResolvedModel, before: dict, after: dict, new_domain: str | None,
          registered: dict | None, change: str, parent: str | None) -> dict:
    """The promotion gate of a new version built from `base`, and the model line's aliases after it:
    `candidate` always, `champion` when the gate passed and `base` is the champion. Logged to the parent
    run (metrics `gate/<domain>/before|after`, tag `nexus.gate`)."""
    from nexus.evaluation import promotion_gate

    verdict = promotion_gate(before, after, new_domain, cfg.extension.gate_tolerance)
    line_info: dict = {"name": line if registered else None, "promoted": False, "aliases": {}, "siblings": []}
    if registered:
        promote = verdict.passed and builds_on_champion(base, line, cfg.tracking.uri)
        line_info["aliases"] = mark_version(line, registered["version"], promote=promote,
                                            gate="passed" if verdict.passed else "failed", base=base.label,
                                            change=change)
        line_info["promoted"] = promote
        line_info["siblings"] = [v for v in versions_built_on(line, base.label) if v["version"] != registered["version"]]
    if parent:
        from flows.tracking import log_gate

        log_gate(parent, verdict)
    return {"table": verdict.table(), "summary": {
        "gate": verdict.to_dict(), "registered": registered,
        "registered_version": registered["version"] if registered else None, "line": line_info}}


def round_report(summary: dict) -> str:
    """An extension's or removal's outcome as text: held-out perplexity per model and domain, the gate's
    verdict and what the model line now points at."""
    from nexus.evaluation import GateVerdict

    ppl, domains = summary["perplexity"], summary["domains"]
    lines = [f"{'model':<16}" + "".join(f"{d[:12]:>13}" for d in domains)]
    lines += [f"{name[:16]:<16}" + "".join(f"{row[d]:>13.2f}" if d in row else f"{'-':>13}" for d in domains)
              for name, row in ppl.items()]
    verdict = GateVerdict.from_dict(summary["gate"])
    line = summary["line"]
    aliases = ", ".join(f"@{a} = v{v}" for a, v in sorted(line["aliases"].items()))
    where = (f"registered {line['name']} version {summary['registered_version']} ({aliases})"
             if summary["registered"] else "not registered (tracking is off)")
    siblings = [f"v{s['version']} ({s['change']})" for s in line.get("siblings", [])]
    return "\n".join([*lines, "", verdict.table(), where]
                     + ([f"also built on {summary['base']['ref']}: {', '.join(siblings)}"] if siblings else []))


def extension_weights(earlier: dict[str, dict], new: dict, domain: str) -> dict[str, float]:
    """The finetuning mix: `extension_new_share` of the new domain, the rest over every earlier domain
    (each read from where it was prepared)."""
    from nexus.data import MixtureConfig, open_prepared, stage_weights

    opened = {p: open_prepared(p) for p in {r["data_dir"] for r in earlier.values()}}
    counts = {d: opened[r["data_dir"]].token_counts()[d] for d, r in earlier.items()}
    counts[domain] = new["token_counts"][domain]
    return stage_weights("extension", counts, list(earlier), MixtureConfig(**new["config"]["mixture"]), domain=domain)


@flow(name="extend_from_inbox")
def extend_from_inbox(experiment: str = "demo", overrides: list[str] | None = None, inbox: str | None = None) -> dict:
    """Extend the model line's champion with every inbox subfolder (one per new domain) it has no expert
    for: one round each, in name order, each building on the champion of its time. Every folder is
    checked before any training; a domain whose extension of the current champion already failed its
    gate is not retried. A quick no-op when there is nothing new."""
    log = get_run_logger()
    cfg = compose(experiment, overrides or [])
    folder = Path(inbox or cfg.extension.inbox)
    candidates = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not candidates:
        log.info("inbox %s: no domain folders; nothing to do", folder)
        return {"inbox": str(folder), "extended": [], "versions": [], "skipped": {}}
    base, line, _ = resolve_base(cfg, None)
    have = base.moe["expert_names"]
    failed = {v["change"].removeprefix("+") for v in versions_built_on(line, base.label) if v["gate"] == "failed"}
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
    return {"inbox": str(folder), "extended": new, "versions": [r["registered_version"] for r in results],
            "promoted": [r["line"]["promoted"] for r in results], "skipped": skipped}
