"""Whole-model training step (forward + backward + AdamW): Nexus router vs linear router, MoE vs seed.

The three models share every weight they have in common (the MoEs are upcycled-shaped copies of
one seed), so they differ only in what is compared. Paper claim: the Nexus router's projection MLP
adds no measurable step time (target: Nexus step ≤ 1.02 × linear-router step).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import measure, parser, print_table, ratio, setup, write_results
from nexus.config import ModelConfig, tiny
from nexus.model.transformer import Transformer, causal_lm_loss

FULL = dict(
    d_model=256, n_layers=4, n_heads=4, ffn_hidden=512, vocab_size=4096, max_seq_len=256, batch=8, n_experts=4
)
QUICK = dict(FULL, n_layers=2, batch=4)


def model_configs(args: argparse.Namespace) -> tuple[dict, dict[str, ModelConfig]]:
    """The seed (dense) config and its top-1 shared-expert MoEs with a linear and a Nexus router."""
    if args.smoke:
        shape, seed = dict(batch=2, n_experts=4, max_seq_len=32), tiny(max_seq_len=32)
    else:
        shape = QUICK if args.quick else FULL
        seed = ModelConfig(**{k: v for k, v in shape.items() if k not in ("batch", "n_experts")})
    names = [f"domain{i}" for i in range(shape["n_experts"])]
    return shape, {
        "dense": seed,
        "linear": seed.with_moe(expert_names=names, router="linear"),
        "nexus": seed.with_moe(expert_names=names, router="nexus"),
    }


def build_models(configs: dict[str, ModelConfig]) -> dict[str, Transformer]:
    """One model per config, all starting from the dense model's weights where names match."""
    models = {name: Transformer(cfg) for name, cfg in configs.items()}
    dense_state = models["dense"].state_dict()
    for model in models.values():
        if model.domain_embeddings is not None:
            model.domain_embeddings.normal_()
        model.load_state_dict(
            {
                k: v
                for k, v in dense_state.items()
                if k in model.state_dict() and model.state_dict()[k].shape == v.shape
            },
            strict=False,
        )
    return models


def train_step(model: Transformer, idx: torch.Tensor) -> Callable[..., None]:
    """A training step on `idx` (B, T + 1), or on the batch passed to it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def run(batch: torch.Tensor = idx) -> None:
        out = model(batch[:, :-1])
        loss = causal_lm_loss(out.logits, batch[:, 1:]) + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    shape, configs = model_configs(args)
    models = build_models(configs)
    idx = torch.randint(0, configs["dense"].vocab_size, (shape["batch"], configs["dense"].max_seq_len + 1))
    t = measure(
        {name: train_step(m, idx) for name, m in models.items()},
        repeats=1 if args.smoke else 5 if args.quick else 9,
        warmup=0 if args.smoke else 2,
    )
    tokens = idx[:, :-1].numel()
    rows = [
        {
            "model": name,
            "step_ms": round(tm.wall_s * 1e3, 2),
            "cpu_ms": round(tm.cpu_s * 1e3, 2),
            "tok_s": round(tokens / tm.wall_s),
            "timing": tm,
        }
        for name, tm in t.items()
    ]
    summary = {
        "nexus_over_linear_step_time": ratio(t["linear"], t["nexus"]),
        "moe_linear_over_dense_step_time": ratio(t["dense"], t["linear"]),
        "tokens_per_step": tokens,
    }
    print_table("Training step, fwd+bwd+AdamW", rows, ["model", "step_ms", "cpu_ms", "tok_s"])
    path = write_results(
        "train_step", args, {"shape": shape, "model": configs["nexus"].to_dict()}, rows, summary
    )
    print(f"summary (time ratios, >1 = slower): {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
