"""`reproduce_paper`: the paper's experiment at CPU scale, several replicates (docs/results.md).

Per replicate seed `s` (experts, MoE training, finetunes, data order and router initialisation all
seeded with `s`; the dense seed model is pretrained once and shared, as the paper branches every
expert from one seed):
1. `upcycle_pipeline`: 4 domain experts, Nexus and linear-router MoEs (same data, steps and
   load-balancing factor), dense merge, the data-matched continued seed;
2. `extend_with_expert` with the held-out domain, for both routers, at each finetuning budget;
3. (`ablation_seeds`) the paper's two ablations of the MoE stage: load-balancing factor 0.0005
   (default 0.05) and uniform instead of size-proportional domain sampling; and the extension's
   finetuning mix (new-domain share 0.25 and 0.75 instead of 0.5) at the middle budget.

Everything lands in `<out_dir>/results.json` (written after every replicate), then
`flows.results.write_results` turns it into `<out_dir>/results/results.md` and its figures.

    python -m flows.reproduce [--seeds 0 1 2] [--budgets 40 100 200] [--ablation-seeds 0] [overrides...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, as_dict, compose
from flows.extend import extend_with_expert
from flows.pipeline import moe_phase, tracking_context, upcycle_pipeline
from flows.tasks import evaluate_models, prepare_data

ABLATIONS = {"load-balance 0.0005": ["router.load_balance_coef=0.0005"], "uniform sampling": ["data.weighting=uniform"]}
EXTENSION_ABLATIONS = {f"new share {share}": [f"data.extension_new_share={share}"] for share in (0.25, 0.75)}


def replicate_overrides(seed: int, out_dir: Path, seed_model: str | None) -> list[str]:
    """Seed every stage after the shared seed model with `seed`; write under `out_dir`."""
    keys = ("train.expert.seed", "train.moe.seed", "train.extension.seed", "router.init_seed")
    return [f"out_dir={out_dir}", *(f"{k}={seed}" for k in keys),
            *([f"seed_checkpoint={seed_model}"] if seed_model else [])]


def save_replicate(results: dict, path: Path, seed: int, start: float, began: float) -> None:
    """Write `results` (with the total wall time since `start`) after replicate `seed`, begun at `began`."""
    from nexus.io import atomic_write_text

    results["seconds"] = round(time.time() - start, 1)
    atomic_write_text(path, json.dumps(results, indent=1, default=str))
    get_run_logger().info("replicate %d done in %.0f s", seed, time.time() - began)


def parse_overrides(parser: argparse.ArgumentParser,
                    argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """`parser`'s arguments and the Hydra key=value overrides, which may stand anywhere in `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return parser.parse_args([a for a in argv if a not in overrides]), overrides


def moe_stage(cfg: PipelineConfig, run_name: str, checkpoints: dict[str, str], out_dir: Path,
              meta: dict) -> tuple[dict, dict]:
    """Upcycle and train the MoEs of `cfg` (its routers) from a replicate's seed, experts and domain
    embeddings into `out_dir`, then evaluate them, under a tracking parent run `run_name`; `meta` is added
    to the checkpoints' metadata. Returns ({router: `train_stage` result}, evaluation)."""
    from nexus.data import open_prepared

    out = Path(cfg.out_dir).resolve()
    with tracking_context(cfg, run_name) as parent:
        track = {"uri": cfg.tracking.uri, "parent_run_id": parent, "register": {}} if parent else None
        data = prepare_data.submit(as_dict(cfg.data), cfg.name, str(out / "data")).result()
        domains = list(data["fingerprints"])
        prepared = open_prepared(data["dir"])
        embeddings = {d: str(prepared.embedding_path(d)) for d in domains}
        experts = {d: checkpoints[f"expert:{d}"] for d in domains}
        meta = {"data_dir": data["dir"], "experiment": cfg.name, "domains": domains,
                "seed_checkpoint": checkpoints["seed"], **meta}
        _, trained = moe_phase(cfg, data, checkpoints["seed"], experts, embeddings, out_dir, meta, track)
        stages = {k: f.result() for k, f in trained.items()}
        moes = {f"moe:{k}": s["checkpoint"] for k, s in stages.items()}
        results = evaluate_models.submit(moes, {d: data["dir"] for d in domains}, cfg.eval.split,
                                         cfg.eval.batch_size, cfg.eval.max_tokens, cfg.torch_threads).result()
    return stages, results


@flow(name="moe_ablation")
def moe_ablation(experiment: str, overrides: list[str], name: str, checkpoints: dict[str, str]) -> dict:
    """The MoE stage again under `overrides` (e.g. another load-balancing factor), from the
    replicate's seed, experts and domain embeddings; returns the MoEs' evaluation."""
    cfg = compose(experiment, overrides)
    cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, dense_merge=False, sparse_upcycling=False))
    out = Path(cfg.out_dir).resolve() / "ablations" / name.replace(" ", "-")
    stages, results = moe_stage(cfg, f"moe_ablation:{name}", checkpoints, out, {"ablation": name})
    moes = {f"moe:{k}": s["checkpoint"] for k, s in stages.items()}
    return {"name": name, "overrides": ABLATIONS.get(name, []), "checkpoints": moes, **results}


@flow(name="reproduce_paper")
def reproduce_paper(experiment: str = "small", overrides: list[str] | None = None, seeds: list[int] | None = None,
                    budgets: list[int] | None = None, ablation_seeds: list[int] | None = None,
                    domain: str = "code") -> dict:
    """Run the replicates (see the module docstring); returns the results written to
    `<out_dir>/results.json` and the paths of the generated report."""
    from flows.results import write_results

    log = get_run_logger()
    overrides, seeds = list(overrides or []), list(seeds if seeds is not None else [0, 1, 2])
    budgets = list(budgets or [40, 100, 200])
    ablation_seeds = [s for s in (ablation_seeds if ablation_seeds is not None else seeds[:1]) if s in seeds]
    base = compose(experiment, overrides)
    root = Path(base.out_dir).resolve()
    results: dict = {"experiment": experiment, "overrides": overrides, "seeds": seeds, "budgets": budgets,
                     "domain": domain, "replicates": {}, "ablations": {}, "extension_ablations": {},
                     "tokens_per_step": base.train.extension.batch_size * (base.data.seq_len or base.model.max_seq_len)}
    start, seed_model = time.time(), None
    for seed in seeds:
        began = time.time()
        run = [*overrides, *replicate_overrides(seed, root / f"seed{seed}", seed_model)]
        pipeline = upcycle_pipeline(experiment, run)
        seed_model = seed_model or pipeline["checkpoints"]["seed"]
        routers = [k.removeprefix("moe:") for k in pipeline["checkpoints"] if k.startswith("moe:")]
        # the extensions run one after another: give each the whole machine (0: torch's default threads)
        def extend(router: str, steps: int, extra: list[str] | None = None, suffix: str = "",
                   run: list[str] = run, moe: dict = pipeline["checkpoints"]) -> dict:
            return extend_with_expert(experiment, [*run, "torch_threads=0", *(extra or [])], domain=domain,
                                      moe=moe[f"moe:{router}"], finetune_steps=steps, tag=f"{router}-{steps}{suffix}")

        extensions = {f"{router}/{steps}": extend(router, steps) for router in routers for steps in budgets}
        results["replicates"][str(seed)] = {"pipeline": pipeline, "extensions": extensions,
                                            "seconds": round(time.time() - began, 1)}
        if seed in ablation_seeds:
            results["ablations"][str(seed)] = {
                name: moe_ablation(experiment, [*run, *extra], name, pipeline["checkpoints"])
                for name, extra in ABLATIONS.items()}
            mid = budgets[len(budgets) // 2]
            results["extension_ablations"][str(seed)] = {
                name: {router: extend(router, mid, extra, "-" + name.replace(" ", "-")) for router in routers}
                for name, extra in EXTENSION_ABLATIONS.items()}
        save_replicate(results, root / "results.json", seed, start, began)
    report = write_results(results, root / "results")
    log.info("results: %s (%.0f s)", report["markdown"], results["seconds"])
    return {**results, "report": {k: str(v) for k, v in report.items()}}


def main(argv: list[str] | None = None) -> int:
    from flows.cli import offline_env

    parser = argparse.ArgumentParser(prog="python -m flows.reproduce", description=__doc__.split("\n\n")[0],
                                     epilog="Any key=value argument is a Hydra override (e.g. out_dir=...).")
    parser.add_argument("--experiment", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[40, 100, 200],
                        help="finetuning steps of the extension (the paper's 200M / 500M / 1B tokens, scaled)")
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=None,
                        help="replicates that also run the ablations (default: the first seed)")
    args, overrides = parse_overrides(parser, argv)
    offline_env()
    out = reproduce_paper(args.experiment, overrides, args.seeds, args.budgets, args.ablation_seeds)
    print(f"\nresults: {out['report']['markdown']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
