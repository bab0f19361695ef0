"""`remove_expert`: drop one routed expert from an MoE of a model line (`nexus.upcycling.remove_expert`:
its FFN slice and its router row / domain embedding; everything else is kept), evaluate the result on
every remaining domain against the model it came from, and register it as the line's next version
through the same promotion gate as an extension (every remaining domain within tolerance).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import names
from flows.config import Experiment, PipelineConfig, compose
from flows.models import fetch_checkpoint, is_path_ref, lock_dir, model_line_lock
from flows.pipeline import (
    evaluation,
    save_config,
    stage_tracking,
    states_of,
    tracking_context,
    write_summary,
)
from flows.rounds import RemovalPlan, judge, plan_removal, publish_round
from flows.tasks import remove_domain_expert, submit


@flow(name="remove_expert")
def remove_expert(
    experiment: Experiment = "demo",
    overrides: list[str] | None = None,
    moe: str | None = None,
    domain: str = "",
) -> dict:
    """Remove one domain's expert from an MoE; the result is evaluated, gated and registered.

    Args:
        experiment: The experiment config (conf/experiment/) the model line belongs to.
        overrides: Hydra `key=value` overrides, e.g. `extension.gate_tolerance=0.1`.
        moe: The MoE: a checkpoint folder, `models:/<name>/<version>`, `models:/<name>@<alias>` or a
            registered name; empty: the model line's `@champion`.
        domain: The expert (domain) to remove.
    """
    cfg = compose(experiment, overrides or [])
    return run_removal(cfg, plan_removal(cfg, moe, domain))


def run_removal(cfg: PipelineConfig, plan: RemovalPlan) -> dict:
    log = get_run_logger()
    with model_line_lock(lock_dir(cfg.tracking.uri, cfg.out_dir), plan.line):
        if not is_path_ref(plan.base.ref):  # the alias may have moved while another run held the line
            plan = plan_removal(cfg, plan.base.ref, plan.domain)
        base, domain = plan.base, plan.domain
        out = (
            Path(cfg.out_dir).resolve()
            / "removals"
            / domain
            / (f"v{base.version}" if base.version else str(base.sha256)[:12])
        )
        save_config(cfg, out)
        with tracking_context(cfg, f"remove_expert:{domain}") as parent:
            moe = fetch_checkpoint(base, Path(cfg.out_dir).resolve() / "models")
            meta = base.config["metadata"]
            track = stage_tracking(cfg, parent, {names.removal(domain): plan.line})
            metadata = {
                **meta,
                "domains": [d for d in base.moe["expert_names"] if d != domain],
                "domain_data": plan.remaining,
                "base": base.describe(),
            }
            futures = {
                "remove": submit(
                    remove_domain_expert,
                    moe=moe,
                    domain=domain,
                    out_dir=str(out / "model"),
                    metadata=metadata,
                    tracking=track,
                )
            }
            removed = futures["remove"].result()
            evaluated = {names.BEFORE: moe, names.AFTER: removed["checkpoint"]}
            futures[names.EVALUATE] = evaluation(
                cfg, evaluated, {d: r["data_dir"] for d, r in plan.remaining.items()}
            )
            results = futures[names.EVALUATE].result()
            gate = judge(
                cfg, plan.line, base, evaluated, results, None, removed["registered"], f"-{domain}", parent
            )
            log.info("promotion gate of %s - %r:\n%s", base.label, domain, gate["table"])
            summary = {
                "removed": domain,
                "router": base.moe["router"],
                "moe": moe,
                "moe_version": base.version,
                "base": base.describe(),
                "result": removed["checkpoint"],
                "domains": list(plan.remaining),
                **gate["summary"],
                **results,
                "states": states_of(futures),
            }
            write_summary(summary, out / "summary.json", parent)
            publish_round(cfg, f"removal of {domain!r} from {base.label}", summary, parent)
    log.info(
        "removed %r from %s -> %s (registered %s)",
        domain,
        base.label,
        removed["checkpoint"],
        summary["registered"] or "nothing: tracking is off",
    )
    return summary
