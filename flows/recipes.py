"""What an extension recipe (`extension.*`, conf/recipe/) turns into: the finetune's training stages, the
data-informed router entry, and the divergent-token metrics of the result. `flows.extend` runs them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import task

from flows.config import PipelineConfig
from flows.contracts import TrackingSettings
from flows.tasks import CACHED, OUTPUTS, TOKENIZER_FILE, tracked
from nexus.training.config import TrainConfig

NEW_EXPERT = "expert:new"
"""In `extension.trainable`: the expert being appended."""


def recipe_of(cfg: PipelineConfig) -> dict[str, Any]:
    """The recipe's settings as recorded in an extension's summary."""
    keys = (
        "recipe",
        "lam",
        "linear_router",
        "router_init",
        "router_fit_steps",
        "trainable",
        "router_warmup_steps",
        "schedule",
        "lr_scale",
        "new_share",
    )
    return {k: getattr(cfg.extension, k) for k in keys}


def finetune_stages(cfg: PipelineConfig, domain: str) -> list[tuple[str, TrainConfig]]:
    """The finetune as training stages: [("warmup", router and new expert only)] + [("finetune", ...)],
    `train.extension.max_steps` in all; `extension.schedule` and `lr_scale` set the learning rate."""
    ext, base = cfg.extension, cfg.train.extension
    lr = base.lr * ext.lr_scale
    schedule = {
        "rewarm": {},
        "constant": {"warmup_frac": 0.0, "min_lr_ratio": 1.0},
        "decay": {"warmup_frac": 0.0},
    }[ext.schedule]
    trainable = [f"expert:{domain}" if g == NEW_EXPERT else g for g in ext.trainable]
    main = dataclasses.replace(
        base, lr=lr, trainable=trainable, max_steps=base.max_steps - ext.router_warmup_steps, **schedule
    )
    main = dataclasses.replace(main, val_every_n_steps=min(main.val_every_n_steps, main.max_steps))
    if not ext.router_warmup_steps:
        return [("finetune", main)]
    warmup = dataclasses.replace(
        base,
        lr=lr,
        trainable=["router", f"expert:{domain}"],
        warmup_frac=0.0,
        min_lr_ratio=1.0,
        max_steps=ext.router_warmup_steps,
        val_every_n_steps=ext.router_warmup_steps,
    )
    return [("warmup", warmup), ("finetune", main)]


def _windows(data_dir: str, domain: str, split: str, n: int, seed: int):
    """`n` random training windows (n, T) of a prepared domain (seeded)."""
    import numpy as np
    import torch

    from nexus.data import open_prepared

    packed = open_prepared(data_dir).packed(domain, split)
    picks = np.random.default_rng([seed, len(packed)]).choice(
        len(packed), size=min(n, len(packed)), replace=False
    )
    return torch.stack([torch.as_tensor(packed[int(i)][:-1]) for i in sorted(picks)])


@task(task_run_name="fit-router-{domain}", **CACHED)
def fit_router(
    *,
    checkpoint: str,
    out_dir: str,
    domain: str,
    dirs: dict[str, str],
    steps: int,
    windows: int = 64,
    seed: int = 0,
    metadata: dict | None = None,
    tracking: TrackingSettings | None = None,
) -> dict:
    """The appended MoE with `domain`'s router entry fitted on training tokens (nexus.router_fit):
    `windows` windows of the new domain, as many spread over the earlier domains `dirs` holds. Logged
    as an MLflow stage run (`router_fit`) whose input is the appended MoE, so lineage walks through it."""
    import torch

    from nexus.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from nexus.router_fit import fit_new_expert_routing

    model = load_checkpoint(checkpoint)
    expert = model.config.moe.expert_names.index(domain)
    earlier = [d for d in dirs if d != domain]
    old = torch.cat([_windows(dirs[d], d, "train", -(-windows // len(earlier)), seed) for d in earlier])
    fit = fit_new_expert_routing(
        model, expert, _windows(dirs[domain], domain, "train", windows, seed), old, steps
    )
    meta = {
        **(metadata or read_checkpoint_config(checkpoint).get("metadata", {})),
        "router_fit": fit.to_dict(),
    }
    config = {"steps": steps, "windows": windows, "seed": seed}
    with tracked(tracking, "router_fit", f"fit-router-{domain}", config, {"appended": checkpoint}) as run:
        path = save_checkpoint(
            model, out_dir, metadata=meta, extra_files={TOKENIZER_FILE: Path(checkpoint) / TOKENIZER_FILE}
        )
        if run is not None:
            run.log_checkpoint(path)
    return {"checkpoint": str(path), "fit": fit.to_dict()}


OUTPUTS["fit_router"] = lambda p: Path(p["out_dir"])  # flows.tasks.submit reruns it when its folder is gone


@task(task_run_name="divergence", **CACHED)
def divergence_metrics(
    *,
    reference: str,
    models: dict[str, str],
    splits: dict[str, str],
    split: str,
    prompts: int,
    prompt_len: int,
    new_tokens: int,
    torch_threads: int = 0,
) -> dict:
    """Divergent-token metrics (nexus.evaluation.divergence) of each of `models` against `reference`,
    on `prompts` held-out prompts of every domain of `splits` ({domain: prepared data dir}); and of
    `reference` with its Nexus routers precomputed against itself live (`"precomputed router"`)."""
    import copy

    import torch

    from nexus.checkpoint import load_checkpoint
    from nexus.data import open_prepared
    from nexus.evaluation.divergence import divergence_by_domain, held_out_prompts

    if torch_threads:
        torch.set_num_threads(torch_threads)
    text = {
        d: held_out_prompts(open_prepared(p).packed(d, split).tokens, prompts, prompt_len)
        for d, p in splits.items()
    }
    ref = load_checkpoint(reference).eval()
    out = {}
    for name, path in models.items():
        out[name] = {
            d: m.to_dict()
            for d, m in divergence_by_domain(ref, load_checkpoint(path).eval(), text, new_tokens).items()
        }
    if ref.domain_embeddings is not None:
        frozen = copy.deepcopy(ref)
        frozen.precompute_routers()
        out["precomputed router"] = {
            d: m.to_dict() for d, m in divergence_by_domain(ref, frozen, text, new_tokens).items()
        }
    return out
