"""Inference tokens/s (eval, `torch.inference_mode`): Nexus with precomputed expert embeddings vs
the linear router, and vs live Nexus routing (the projection `P_r(D)` evaluated every forward).

Paper claim (Table 3): once `E = P_r(D)` is precomputed, Nexus costs what a vanilla MoE costs
(target: precomputed Nexus ≤ 1.01 × linear-router time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.bench_train_step import build_models, model_configs
from benchmarks.common import measure, parser, print_table, ratio, setup, write_results
from nexus.model.transformer import Transformer


def forward(model: Transformer, idx: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(idx)

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    shape, configs = model_configs(args)
    models = build_models(configs)
    live = build_models({"dense": configs["dense"], "nexus": configs["nexus"]})["nexus"]
    live.load_state_dict(models["nexus"].state_dict())
    for m in (*models.values(), live):
        m.eval()
    models["nexus"].precompute_routers()
    with torch.no_grad():  # same router matrix E, so both route identically: only the mechanism differs
        for lin, nex in zip(models["linear"].blocks, models["nexus"].blocks):
            lin.ffn.router.weight.copy_(nex.ffn.router.precomputed)
    cands = {
        "linear": models["linear"],
        "nexus_precomputed": models["nexus"],
        "nexus_live": live,
        "dense": models["dense"],
    }
    idx = torch.randint(0, configs["dense"].vocab_size, (shape["batch"], configs["dense"].max_seq_len))
    t = measure(
        {name: forward(m, idx) for name, m in cands.items()},
        repeats=1 if args.smoke else 7 if args.quick else 21,
        warmup=0 if args.smoke else 2,
    )
    rows = [
        {
            "model": name,
            "ms": round(tm.wall_s * 1e3, 2),
            "cpu_ms": round(tm.cpu_s * 1e3, 2),
            "tok_s": round(idx.numel() / tm.wall_s),
            "timing": tm,
        }
        for name, tm in t.items()
    ]
    summary = {
        "precomputed_over_linear_time": ratio(t["linear"], t["nexus_precomputed"]),
        "live_over_precomputed_time": ratio(t["nexus_precomputed"], t["nexus_live"]),
    }
    print_table("Inference forward", rows, ["model", "ms", "cpu_ms", "tok_s"])
    path = write_results("inference", args, {"shape": shape}, rows, summary)
    print(f"summary (time ratios, >1 = slower): {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
