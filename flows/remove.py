"""`remove_expert`: drop one routed expert from an MoE of a model line (`nexus.upcycling.remove_expert`:
its FFN slice and its router row / domain embedding; everything else is kept), evaluate the result on
every remaining domain against the model it came from, and register it as the line's next version
through the same promotion gate as an extension (every remaining domain within tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, compose
from flows.extend import judge
from flows.models import (
    ResolvedModel,
    domain_records,
    fetch_checkpoint,
    is_path_ref,
    line_name,
    lock_dir,
    model_line_lock,
    resolve_model,
)
from flows.pipeline import states_of, tracking_context, write_summary
from flows.tasks import evaluate_models, remove_domain_expert, submit
from nexus.errors import ConfigError


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
        raise ConfigError(f"domain {domain!r}: removing it would leave {len(names) - 1} expert(s) for top_k={top_k}")
    records = domain_records(base.config, base.label)
    return RemovalPlan(domain, base, line_name(cfg.tracking.model_name, base.moe["router"]),
                       {d: r for d, r in records.items() if d != domain})


@flow(name="remove_expert")
def remove_expert(experiment: str = "demo", overrides: list[str] | None = None, moe: str | None = None,
                  domain: str = "") -> dict:
    """Remove `domain`'s expert from `moe` (a checkpoint directory or model reference; None: the line's
    champion); the result is evaluated, gated and registered like an extension."""
    cfg = compose(experiment, overrides or [])
    return run_removal(cfg, plan_removal(cfg, moe, domain))


def run_removal(cfg: PipelineConfig, plan: RemovalPlan) -> dict:
    log = get_run_logger()
    with model_line_lock(lock_dir(cfg.tracking.uri, cfg.out_dir), plan.line):
        if not is_path_ref(plan.base.ref):  # the alias may have moved while another run held the line
            plan = plan_removal(cfg, plan.base.ref, plan.domain)
        base, domain = plan.base, plan.domain
        out = Path(cfg.out_dir).resolve() / "removals" / domain / (f"v{base.version}" if base.version
                                                                    else str(base.sha256)[:12])
        with tracking_context(cfg, f"remove_expert:{domain}") as parent:
            moe = fetch_checkpoint(base, Path(cfg.out_dir).resolve() / "models")
            meta = base.config["metadata"]
            track = {"uri": cfg.tracking.uri, "parent_run_id": parent,
                     "register": {f"remove-{domain}": plan.line}} if parent else None
            metadata = {**meta, "domains": [d for d in base.moe["expert_names"] if d != domain],
                        "domain_data": plan.remaining, "base": base.describe()}
            futures = {"remove": submit(remove_domain_expert, moe, domain, str(out / "model"), metadata=metadata,
                                        tracking=track)}
            removed = futures["remove"].result()
            futures["evaluate"] = evaluate_models.submit(
                {"before": moe, "after": removed["checkpoint"]}, {d: r["data_dir"] for d, r in plan.remaining.items()},
                cfg.eval.split, cfg.eval.batch_size, cfg.eval.max_tokens, cfg.torch_threads)
            results = futures["evaluate"].result()
            gate = judge(cfg, plan.line, base, results["perplexity"]["before"], results["perplexity"]["after"], None,
                         removed["registered"], f"-{domain}", parent)
            log.info("promotion gate of %s - %r:\n%s", base.label, domain, gate["table"])
            summary = {"removed": domain, "router": base.moe["router"], "moe": moe, "moe_version": base.version,
                       "base": base.describe(), "result": removed["checkpoint"], "domains": list(plan.remaining),
                       **gate["summary"], **results, "states": states_of(futures)}
            write_summary(summary, out / "summary.json", parent)
    log.info("removed %r from %s -> %s (registered %s)", domain, base.label, removed["checkpoint"],
             summary["registered"] or "nothing: tracking is off")
    return summary
