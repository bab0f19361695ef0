"""`bam_experiment`: BAM attention experts (arXiv 2408.08274) vs the FFN-only MoE, Nexus and linear
routers, at the reproduction's CPU scale (docs/results.md, "BAM: attention experts").

Per replicate seed `s` (experts, MoE training, data order and router initialisation seeded with `s`,
as in `flows.reproduce`; the dense seed model is pretrained once and shared):
1. `upcycle_pipeline` without MoEs: the 4 domain experts and their domain embeddings;
2. `bam_moe_stage` once per variant, from that seed model, those experts and embeddings: the MoE
   stage (upcycle, train on the same data for the same steps, evaluate) of `ffn-only` (attention
   averaged), `bam-full` and `bam-shared-kv` (soft routing over the attention experts), each with a
   Nexus and a linear router; only the attention differs between variants;
3. (`ablation_seeds`) `bam-full` with the seed's attention as an always-on shared attention expert.

Per trained MoE it records the held-out perplexities, the stage's wall time per step, the KV-cache
bytes per token and the parameter counts; `<out_dir>/bam.json` is written after every replicate and
`flows.bam_results` turns it into `<out_dir>/results/bam.md` and its figures.

    python -m flows.bam [--experiment bam] [--seeds 0 1 2] [--ablation-seeds 0] [overrides...]   (make bam)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows import names
from flows.config import PipelineConfig, as_dict, compose
from flows.contracts import StageOutcome
from flows.pipeline import evaluation, moe_phase, stage_tracking, tracking_context, upcycle_pipeline
from flows.reproduce import parse_overrides, replicate_overrides, save_replicate
from flows.tasks import prepare_data

VARIANTS = {
    "ffn-only": [],
    "bam-full": ["router.attention_experts=full"],
    "bam-shared-kv": ["router.attention_experts=shared_kv"],
}
ABLATIONS = {
    "bam-full + shared attention": ["router.attention_experts=full", "router.attention_shared_expert=true"]
}
NO_MOES = [
    "router.routers=[]",
    "router.dense_merge=false",
    "router.sparse_upcycling=false",
    "router.continued_seed=false",
]


def model_facts(checkpoint: str) -> dict:
    """KV-cache bytes per token (an allocated `KVCache`, fp32) and parameter counts of a checkpoint."""
    from nexus.checkpoint import load_checkpoint
    from nexus.model.params import parameter_counts
    from nexus.model.transformer import KVCache

    model = load_checkpoint(checkpoint)
    return {
        "kv_bytes_per_token": KVCache(model.config, 1).bytes_per_token(),
        "params": parameter_counts(model),
    }


def stage_timing(stage: StageOutcome) -> dict:
    """`{steps, seconds_per_step}` of a `train_stage` result: its wall time over the steps it trained;
    `seconds_per_step` is None when it trained none here (its checkpoint predates the task: a finished
    stage of an earlier run, returned at once)."""
    trained = stage.global_step - (stage.resumed_from_step or 0)
    weights = Path(stage.checkpoint) / "model.safetensors"
    timed = trained > 0 and weights.stat().st_mtime >= stage.started
    seconds = (stage.finished - stage.started) / trained if timed else None
    return {"steps": stage.global_step, "seconds_per_step": seconds}


def moe_stage(
    cfg: PipelineConfig, run_name: str, checkpoints: dict[str, str], out_dir: Path, meta: dict
) -> tuple[dict, dict]:
    """Upcycle and train the MoEs of `cfg` (its routers) from a replicate's seed, experts and domain
    embeddings into `out_dir`, then evaluate them, under a tracking parent run `run_name`; `meta` is added
    to the checkpoints' metadata. Returns ({router: `train_stage` result}, evaluation)."""
    from nexus.data import open_prepared

    out = Path(cfg.out_dir).resolve()
    with tracking_context(cfg, run_name) as parent:
        track = stage_tracking(cfg, parent)
        data = prepare_data.submit(
            data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(out / "data")
        ).result()
        domains = data.domains
        prepared = open_prepared(data.dir)
        embeddings = {d: str(prepared.embedding_path(d)) for d in domains}
        experts = {d: checkpoints[names.expert(d)] for d in domains}
        meta = {
            "data_dir": data.dir,
            "experiment": cfg.name,
            "domains": domains,
            "seed_checkpoint": checkpoints[names.SEED],
            **meta,
        }
        _, trained = moe_phase(cfg, data, checkpoints[names.SEED], experts, embeddings, out_dir, meta, track)
        stages = {k: f.result() for k, f in trained.items()}
        moes = {names.moe(k): s.checkpoint for k, s in stages.items()}
        results = evaluation(cfg, moes, dict.fromkeys(domains, data.dir)).result()
    return stages, results


@flow(name="bam_moe_stage")
def bam_moe_stage(experiment: str, overrides: list[str], name: str, checkpoints: dict[str, str]) -> dict:
    """The MoE stage under `overrides` (one attention variant) from the replicate's seed model,
    experts and domain embeddings, for every router; returns the MoEs' evaluation, training time
    per step and `model_facts`."""
    cfg = compose(experiment, overrides)
    out = Path(cfg.out_dir).resolve() / "bam" / name.replace(" ", "").replace("+", "-")
    stages, results = moe_stage(cfg, f"bam_moe_stage:{name}", checkpoints, out, {"variant": name})
    moes = {names.moe(k): s.checkpoint for k, s in stages.items()}
    training = {names.moe(k): stage_timing(s) for k, s in stages.items()}
    return {
        "name": name,
        "overrides": overrides,
        "checkpoints": moes,
        "training": training,
        "models": {m: model_facts(path) for m, path in moes.items()},
        **results,
    }


@flow(name="bam_experiment")
def bam_experiment(
    experiment: str = "bam",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    ablation_seeds: list[int] | None = None,
) -> dict:
    """Run the replicates (see the module docstring); returns the results written to
    `<out_dir>/bam.json` and the paths of the generated report."""
    from flows.bam_results import write_bam_results

    log = get_run_logger()
    overrides, seeds = list(overrides or []), list(seeds if seeds is not None else [0, 1, 2])
    ablation_seeds = [s for s in (ablation_seeds if ablation_seeds is not None else seeds[:1]) if s in seeds]
    root = Path(compose(experiment, overrides).out_dir).resolve()
    results: dict = {
        "experiment": experiment,
        "overrides": overrides,
        "seeds": seeds,
        "ablation_seeds": ablation_seeds,
        "variants": {**VARIANTS, **ABLATIONS},
        "replicates": {},
    }
    start, seed_model = time.time(), None
    for seed in seeds:
        began = time.time()
        run = [*overrides, *replicate_overrides(seed, root / f"seed{seed}", seed_model)]
        pipeline = upcycle_pipeline(experiment, [*run, *NO_MOES])
        seed_model = seed_model or pipeline["checkpoints"][names.SEED]
        variants = {**VARIANTS, **(ABLATIONS if seed in ablation_seeds else {})}
        stages = {
            name: bam_moe_stage(experiment, [*run, *extra], name, pipeline["checkpoints"])
            for name, extra in variants.items()
        }
        results["replicates"][str(seed)] = {
            "pipeline": pipeline,
            "variants": stages,
            "seconds": round(time.time() - began, 1),
        }
        save_replicate(results, root / "bam.json", seed, start, began)
    report = write_bam_results(results, root / "results")
    log.info("results: %s (%.0f s)", report["markdown"], results["seconds"])
    return {**results, "report": {k: str(v) for k, v in report.items()}}


def main(argv: list[str] | None = None) -> int:
    from flows.home import offline_env

    parser = argparse.ArgumentParser(
        prog="python -m flows.bam",
        description=__doc__.split("\n\n")[0],
        epilog="Any key=value argument is a Hydra override (e.g. out_dir=...).",
    )
    parser.add_argument("--experiment", default="bam")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="replicates that also run the shared-attention-expert ablation (default: the first)",
    )
    args, overrides = parse_overrides(parser, argv)
    offline_env(compose(args.experiment, overrides).home)  # a bad experiment or override fails here
    out = bam_experiment(args.experiment, overrides, args.seeds, args.ablation_seeds)
    print(f"\nresults: {out['report']['markdown']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
