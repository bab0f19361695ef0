"""What an extension or removal round needs besides the flows themselves: its plan (every input checked
without writing anything: the CLI runs these before any flow starts, so a typo fails in a second,
before Prefect is even imported), its finetuning mix, its promotion gate and how its outcome reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flows import names
from flows.config import PipelineConfig
from flows.contracts import PreparedData
from flows.models import (
    ResolvedModel,
    builds_on_champion,
    domain_records,
    line_name,
    mark_version,
    resolve_model,
    versions_built_on,
)
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
        splits = cfg.data.to_data_config(
            cfg.name, str(Path(cfg.out_dir) / "data"), keep=[], extra={domain: folder}
        )
        check_folder_domain(domain, folder, splits.splits)
    elif domain not in _preset_domains(cfg):
        raise ConfigError(
            f"domain {domain!r}: no folder given and experiment {cfg.name!r} has no domain of that "
            f"name (it has {sorted(_preset_domains(cfg))})"
        )


def _preset_domains(cfg: PipelineConfig) -> set[str]:
    from nexus.data import preset

    if cfg.data.preset == "none":
        return set(cfg.data.folders)
    data = (
        preset(cfg.data.preset, corpora_dir=cfg.data.corpora_dir)
        if cfg.data.preset == "tiny"
        else preset(cfg.data.preset)
    )
    return {d.name for d in data.domains} | set(cfg.data.folders)


def resolve_base(
    cfg: PipelineConfig, ref: str | None, domain: str | None = None
) -> tuple[ResolvedModel, str, dict[str, dict]]:
    """The model to extend (None: the line's champion) and what it serves; refuses a domain it has."""
    base = resolve_model(ref, cfg.tracking.model_name, cfg.tracking.uri, "moe")
    names = base.moe["expert_names"]
    if domain is not None and domain in names:
        raise ConfigError(f"domain {domain!r}: {base.label} already has an expert of that name ({names})")
    return (
        base,
        line_name(cfg.tracking.model_name, base.moe["router"]),
        domain_records(base.config, base.label),
    )


def plan_extension(
    cfg: PipelineConfig, moe_ref: str | None, domain: str, folder: str | None
) -> ExtensionPlan:
    """Check every input of an extension before anything is written (ConfigError/DataError naming it)."""
    check_new_domain(cfg, domain, folder)
    base, line, earlier = resolve_base(cfg, moe_ref, domain)
    check_embedder(cfg, base.moe, domain)
    return ExtensionPlan(domain, folder, base, line, earlier)


def check_embedder(cfg: PipelineConfig, moe: dict, domain: str) -> None:
    """A router that reads domain embeddings (Nexus) reads them of one size: fail before training the
    new expert if the configured embedder produces another (e.g. not the model the MoE was built with)."""
    from nexus.model.routers import get_router

    if not get_router(moe["router"]).uses_domain_embeddings:
        return
    from nexus.data import check_embedding_dim, load_embedder

    embedder = load_embedder(cfg.data.embedding.model or "default")
    check_embedding_dim([0.0] * embedder.dim, moe["domain_embed_dim"], domain, f"embedder {embedder.name}")


@dataclass(frozen=True)
class RemovalPlan:
    domain: str
    base: ResolvedModel
    line: str
    remaining: dict[str, dict]
    """{domain: domain_record} of the domains the result still serves."""


def plan_removal(cfg: PipelineConfig, moe_ref: str | None, domain: str) -> RemovalPlan:
    """Check a removal before anything is written: the model resolves, has an expert `domain`, and keeps
    at least `top_k` experts."""
    from nexus.data import check_domain_name

    check_domain_name(domain)
    base = resolve_model(moe_ref, cfg.tracking.model_name, cfg.tracking.uri, "moe")
    names, top_k = base.moe["expert_names"], base.moe["top_k"]
    if domain not in names:
        raise ConfigError(f"domain {domain!r}: {base.label} has no expert of that name ({names})")
    if len(names) - 1 < max(1, top_k):
        raise ConfigError(
            f"domain {domain!r}: removing it would leave {len(names) - 1} expert(s) for top_k={top_k}"
        )
    records = domain_records(base.config, base.label)
    return RemovalPlan(
        domain,
        base,
        line_name(cfg.tracking.model_name, base.moe["router"]),
        {d: r for d, r in records.items() if d != domain},
    )


def judge(
    cfg: PipelineConfig,
    line: str,
    base: ResolvedModel,
    evaluated: dict[str, str],
    results: dict,
    new_domain: str | None,
    registered: dict | None,
    change: str,
    parent: str | None,
) -> dict:
    """The promotion gate of a new version built from `base` (`evaluated`: {"before": base, ..., "after":
    the new version} and their `results` from evaluate_models), and the model line's aliases after it:
    `candidate` always, `champion` when the gate passed and `base` is the champion. Logged to MLflow: the
    verdict and the evaluation on the parent run (metrics `gate/<domain>/before|after`, tag
    `nexus.gate`; see flows.mlflow_models.log_evaluation), and the new version's description."""
    from nexus.evaluation import promotion_gate

    before, after = results["perplexity"][names.BEFORE], results["perplexity"][names.AFTER]

    verdict = promotion_gate(before, after, new_domain, cfg.extension.gate_tolerance)
    line_info: dict = {"name": line if registered else None, "promoted": False, "aliases": {}, "siblings": []}
    if registered:
        from flows.mlflow_models import describe_version

        describe_version(
            line,
            registered["version"],
            after,
            f"{change} on {base.label}: promotion gate "
            f"{'passed' if verdict.passed else 'failed'} (earlier domains within "
            f"{verdict.tolerance:.0%}{', new domain improves' if new_domain else ''}).",
        )
        promote = verdict.passed and builds_on_champion(base, line, cfg.tracking.uri)
        line_info["aliases"] = mark_version(
            line,
            registered["version"],
            promote=promote,
            gate="passed" if verdict.passed else "failed",
            base=base.label,
            change=change,
        )
        line_info["promoted"] = promote
        line_info["siblings"] = [
            v for v in versions_built_on(line, base.label) if v["version"] != registered["version"]
        ]
    if parent:
        from flows.mlflow_models import log_evaluation
        from flows.tracking import log_gate

        log_gate(parent, verdict)
        log_evaluation(parent, evaluated, results)
    return {
        "table": verdict.table(),
        "summary": {
            "gate": verdict.to_dict(),
            "registered": registered,
            "registered_version": registered["version"] if registered else None,
            "line": line_info,
        },
    }


def publish_round(cfg: PipelineConfig, title: str, summary: dict, parent: str | None) -> None:
    """An extension's or removal's Prefect artifacts: summary with the gate's verdict, perplexity, links."""
    from flows.artifacts import gate_markdown, publish

    line = summary["line"]
    facts = {
        "base": f"`{summary['base']['ref']}` ({summary['base']['path'] or summary['base']['version']})",
        "registered": f"{line['name']} version {summary['registered_version']}"
        if summary["registered"]
        else "nothing (tracking is off)",
        "aliases": ", ".join(f"@{a} = v{v}" for a, v in sorted(line["aliases"].items())) or "-",
    }
    publish(
        "extension" if "domain" in summary else "removal",
        cfg.name,
        title,
        facts,
        summary["perplexity"],
        cfg.tracking.uri if parent else None,
        parent,
        [summary["registered"]] if summary["registered"] else [],
        {"Promotion gate": gate_markdown(summary["gate"])},
    )


def round_report(summary: dict) -> str:
    """An extension's or removal's outcome as text: held-out perplexity per model and domain, the gate's
    verdict and what the model line now points at."""
    from nexus.evaluation import GateVerdict

    ppl, domains = summary["perplexity"], summary["domains"]
    lines = [f"{'model':<16}" + "".join(f"{d[:12]:>13}" for d in domains)]
    lines += [
        f"{name[:16]:<16}" + "".join(f"{row[d]:>13.2f}" if d in row else f"{'-':>13}" for d in domains)
        for name, row in ppl.items()
    ]
    verdict = GateVerdict.from_dict(summary["gate"])
    line = summary["line"]
    aliases = ", ".join(f"@{a} = v{v}" for a, v in sorted(line["aliases"].items()))
    where = (
        f"registered {line['name']} version {summary['registered_version']} ({aliases})"
        if summary["registered"]
        else "not registered (tracking is off)"
    )
    siblings = [f"v{s['version']} ({s['change']})" for s in line.get("siblings", [])]
    return "\n".join(
        [*lines, "", verdict.table(), where]
        + (
            [f"also built on the same base, v{summary['base']['version']}: {', '.join(siblings)}"]
            if siblings
            else []
        )
    )


def extension_weights(
    earlier: dict[str, dict], new: PreparedData, domain: str, share: float | None = None
) -> dict[str, float]:
    """The finetuning mix: `share` (None: the data config's `extension_new_share`) of the new domain, the
    rest over every earlier domain (each read from where it was prepared)."""
    from nexus.data import MixtureConfig, open_prepared, stage_weights

    opened = {p: open_prepared(p) for p in {r["data_dir"] for r in earlier.values()}}
    counts = {d: opened[r["data_dir"]].token_counts()[d] for d, r in earlier.items()}
    counts[domain] = new.token_counts[domain]
    mixture = MixtureConfig(**new.config["mixture"])
    if share is not None:
        mixture = dataclasses.replace(mixture, extension_new_share=share)
    return stage_weights("extension", counts, list(earlier), mixture, domain=domain)
