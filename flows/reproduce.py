"""`reproduce_paper`: the paper's experiment in the paper's regime at CPU size, several replicates
(docs/results.md; experiment `paper_regime`).

The dense seed is pretrained once, much longer than anything after it (`seed_model`: cached under
`<out_dir>/seed-<key>`, the key hashing its model, training and data, so replicates and reruns reuse
it). Per replicate seed `s` (experts, MoE training, finetunes, data order and router initialisation all
seeded with `s`):
1. `upcycle_pipeline`: the domain experts, Nexus and linear-router MoEs (same data, steps and
   load-balancing factor), dense merge, the data-matched continued seed;
2. `extend_with_expert` for each held-out domain x router variant (`nexus`, `linear-reset`: the
   paper's baseline, `linear-append`: the trained rows kept) x extension recipe (conf/recipe/) x
   finetuning budget;
3. after every replicate (`ablation_seeds`): the paper's recipe with one factor changed at a time
   (`RECIPE_ABLATIONS`), at the smallest budget.

Everything lands in `<out_dir>/results.json` (written after every replicate), then
`flows.results.write_results` turns it into `<out_dir>/results/results.md` and its figures.

    python -m flows.reproduce [--seeds 0 1 2] [--budgets 4 12] [--ablation-seeds 0] [--seed-only] [overrides...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows import names
from flows.config import PipelineConfig, as_dict, compose
from flows.contracts import PreparedData
from flows.extend import extend_with_expert
from flows.pipeline import upcycle_pipeline
from flows.stages import stage_spec
from flows.tasks import prepare_data, submit, train_stage
from nexus.data.cache import fingerprint as hash_json

DOMAINS = ("code", "german")
ROUTERS = {"nexus": "nexus", "linear-reset": "linear", "linear-append": "linear"}
"""Router variant -> the MoE it extends; `linear-*` set `extension.linear_router`."""
RECIPES = ("paper", "protect")
RECIPE_ABLATIONS = {
    "λ = 0": ["extension.lam=0.0"],
    "constant LR": ["extension.schedule=constant"],
    "train new expert + router": ["extension.trainable=[router,expert:new]"],
    "… + non-FFN": ["extension.trainable=[router,expert:new,non_ffn]"],
    "router warm-up (2 steps)": ["extension.router_warmup_steps=2"],
    "data-informed router entry": ["extension.router_init=data"],
    "new share 0.25": ["extension.new_share=0.25"],
}
"""One factor of the `paper` recipe changed at a time (`recipe=paper` plus these overrides)."""


def replicate_overrides(seed: int, out_dir: Path, seed_model: str | None) -> list[str]:
    """Seed every stage after the shared seed model with `seed`; write under `out_dir`."""
    keys = ("train.expert.seed", "train.moe.seed", "train.extension.seed", "router.init_seed")
    return [
        f"out_dir={out_dir}",
        *(f"{k}={seed}" for k in keys),
        *([f"seed_checkpoint={seed_model}"] if seed_model else []),
    ]


def variant_overrides(variant: str) -> list[str]:
    return (
        [f"extension.linear_router={variant.removeprefix('linear-')}"]
        if variant.startswith("linear-")
        else []
    )


def seed_key(cfg: PipelineConfig, data: PreparedData) -> str:
    """What the seed depends on: architecture, seed-stage training config, its data and mix."""
    model = as_dict(dataclasses.replace(cfg.model, vocab_size=data.vocab_size, moe=None))
    weights = data.weights("seed", cfg.data.seed_domains)
    return hash_json([model, cfg.train.seed.identity(), data.fingerprint(weights)])


@flow(name="seed_model")
def seed_model(experiment: str = "paper_regime", overrides: list[str] | None = None) -> str:
    """The experiment's dense seed, trained once per config under `<out_dir>/seed-<key>` (a rerun, or
    another replicate, finds it finished and returns it at once)."""
    cfg = compose(experiment, overrides or [])
    out = Path(cfg.out_dir).resolve()
    data = prepare_data.submit(
        data=as_dict(cfg.data), experiment=cfg.name, out_dir=str(out / "data")
    ).result()
    model = as_dict(dataclasses.replace(cfg.model, vocab_size=data.vocab_size, moe=None))
    seed_dir = out / f"seed-{seed_key(cfg, data)[:12]}"
    spec = stage_spec(
        "seed", names.SEED, cfg, data, str(seed_dir), domains=cfg.data.seed_domains, model=model
    )
    # the seed trains alone, before anything else: on every core (torch's default), not `cfg.torch_threads`
    result = submit(train_stage, spec=spec, torch_threads=0).result()
    get_run_logger().info("seed model: %s", result.checkpoint)
    return result.checkpoint


def save_replicate(
    results: dict, path: Path, seed: int, start: float, began: float, what: str = "replicate"
) -> None:
    """Write `results` (with the total wall time since `start`) after `what` of seed `seed`, begun at `began`."""
    from nexus.io import atomic_write_text

    results["seconds"] = round(time.time() - start, 1)
    atomic_write_text(path, json.dumps(results, indent=1, default=str))
    get_run_logger().info("%s %d done in %.0f s", what, seed, time.time() - began)


def parse_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """`parser`'s arguments and the Hydra key=value overrides, which may stand anywhere in `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return parser.parse_args([a for a in argv if a not in overrides]), overrides


@flow(name="reproduce_paper")
def reproduce_paper(
    experiment: str = "paper_regime",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    budgets: list[int] | None = None,
    ablation_seeds: list[int] | None = None,
    domains: list[str] | None = None,
    recipes: list[str] | None = None,
    routers: list[str] | None = None,
    ablations: dict[str, list[str]] | None = None,
) -> dict:
    """Run the replicates (see the module doc); returns the results written to `<out_dir>/results.json`
    and the paths of the generated report."""
    from flows.results import write_results

    log = get_run_logger()
    overrides, seeds = list(overrides or []), list(seeds if seeds is not None else [0, 1, 2])
    budgets, domains = list(budgets or [8, 24]), list(domains or DOMAINS)
    recipes, routers = list(recipes or RECIPES), list(routers or ROUTERS)
    ablations = dict(RECIPE_ABLATIONS if ablations is None else ablations)
    ablation_seeds = [s for s in (ablation_seeds if ablation_seeds is not None else seeds[:1]) if s in seeds]
    base = compose(experiment, overrides)
    root = Path(base.out_dir).resolve()
    results: dict = {
        "experiment": experiment,
        "overrides": overrides,
        "seeds": seeds,
        "budgets": budgets,
        "domains": domains,
        "routers": routers,
        "recipes": recipes,
        "replicates": {},
        "recipe_ablations": {},
        "ablations": {},
        "tokens_per_step": base.train.extension.batch_size
        * (base.data.packing.seq_len or base.model.max_seq_len),
        "steps": {k: getattr(base.train, k).max_steps for k in ("seed", "expert", "moe")},
    }
    start = time.time()
    results["seed_model"] = seed_model(experiment, overrides)
    results["seed_seconds"] = round(time.time() - start, 1)

    def extend(
        run: list[str],
        moes: dict,
        domain: str,
        variant: str,
        recipe: str,
        steps: int,
        extra: list[str] | None = None,
        suffix: str = "",
    ) -> dict:
        tag = f"{variant}-{recipe}-{steps}{suffix}"
        return extend_with_expert(
            experiment,
            [*run, f"recipe={recipe}", *variant_overrides(variant), *(extra or [])],
            domain=domain,
            moe=moes[names.moe(ROUTERS[variant])],
            finetune_steps=steps,
            tag=tag,
        )

    runs = {}
    for seed in seeds:
        began = time.time()
        run = [*overrides, *replicate_overrides(seed, root / f"seed{seed}", results["seed_model"])]
        pipeline = upcycle_pipeline(experiment, run)
        runs[seed] = (run, pipeline["checkpoints"])
        extensions = {
            f"{d}/{v}/{r}/{b}": extend(run, pipeline["checkpoints"], d, v, r, b)
            for d in domains
            for v in routers
            for r in recipes
            for b in budgets
        }
        results["replicates"][str(seed)] = {
            "pipeline": pipeline,
            "extensions": extensions,
            "seconds": round(time.time() - began, 1),
        }
        save_replicate(results, root / "results.json", seed, start, began)
    for seed in ablation_seeds:  # after every replicate: the main comparison first
        began = time.time()
        run, moes = runs[seed]
        results["recipe_ablations"][str(seed)] = {
            name: {
                f"{d}/{v}": extend(run, moes, d, v, "paper", budgets[0], extra, "-" + _slug(name))
                for d in domains
                for v in routers
            }
            for name, extra in ablations.items()
        }
        save_replicate(results, root / "results.json", seed, start, began, "recipe ablations of replicate")
    report = write_results(results, root / "results")
    log.info("results: %s (%.0f s)", report["markdown"], results["seconds"])
    return {**results, "report": {k: str(v) for k, v in report.items()}}


def _slug(name: str) -> str:
    return (
        "".join(c if c.isalnum() else "-" for c in name.encode("ascii", "ignore").decode()).strip("-").lower()
    )


def main(argv: list[str] | None = None) -> int:
    from flows.home import offline_env

    parser = argparse.ArgumentParser(
        prog="python -m flows.reproduce",
        description=__doc__.split("\n\n")[0],
        epilog="Any key=value argument is a Hydra override (e.g. out_dir=...).",
    )
    parser.add_argument("--experiment", default="paper_regime")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[4, 12],
        help="finetuning steps of the extension (smallest first)",
    )
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="replicates that also run the recipe ablations (default: the first seed)",
    )
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="held-out domains to extend with")
    parser.add_argument(
        "--seed-only", action="store_true", help="train (or find) the cached seed model and stop"
    )
    args, overrides = parse_overrides(parser, argv)
    offline_env()
    if args.seed_only:
        print(f"\nseed model: {seed_model(args.experiment, overrides)}")
        return 0
    out = reproduce_paper(
        args.experiment, overrides, args.seeds, args.budgets, args.ablation_seeds, args.domains
    )
    print(f"\nresults: {out['report']['markdown']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
