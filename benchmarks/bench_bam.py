"""BAM attention experts vs the FFN-only MoE: training step, inference forward and KV-cached greedy
decoding time, KV-cache bytes per token and parameters (total / active), at the BAM experiment's shape.

Shape (default): the `small` model of the CPU-scale reproduction (d_model 128, 4 layers, 4 heads,
SwiGLU 384, 4,096-token vocabulary, 128-token sequences, batch 8), parallel blocks, 4 routed experts,
top-1 FFN routing with the shared expert, Nexus routers: exactly the MoEs `flows/bam.py` trains.
Candidates: `ffn-only` (attention averaged), `bam-full` and `bam-shared-kv` (soft routing over the
4 attention experts, BAM's choice) and `bam-full-top1` (top-1 attention routing: it computes every
expert too, since every expert's keys and values are needed at every position).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.bench_inference import forward
from benchmarks.bench_train_step import train_step
from benchmarks.common import measure, parser, print_table, ratio, setup, write_results
from nexus.config import ModelConfig, tiny
from nexus.evaluation.generation import generate
from nexus.model.params import parameter_counts
from nexus.model.transformer import KVCache, Transformer
from nexus.upcycling import upcycle

FULL = {
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "ffn_hidden": 384,
    "vocab_size": 4096,
    "max_seq_len": 128,
    "batch": 8,
    "n_experts": 4,
    "prompt": 32,
    "new": 64,
}
VARIANTS = {
    "ffn-only": {},
    "bam-full": {"attention_experts": "full"},
    "bam-shared-kv": {"attention_experts": "shared_kv"},
    "bam-full-top1": {"attention_experts": "full", "attention_routing": "top_k", "attention_top_k": 1},
}


def build(args: argparse.Namespace) -> tuple[dict, dict[str, Transformer]]:
    """The dense seed, n re-initialised experts, and one MoE per variant upcycled from them."""
    if args.smoke:
        shape = {"batch": 2, "n_experts": 2, "prompt": 8, "new": 8}
        config = tiny(max_seq_len=32)
    else:
        shape = FULL
        config = ModelConfig(
            **{k: v for k, v in shape.items() if k not in ("batch", "n_experts", "prompt", "new")}
        )
    seed = Transformer(config).reinit_(torch.Generator().manual_seed(0))
    experts = [
        Transformer(config).reinit_(torch.Generator().manual_seed(i + 1)) for i in range(shape["n_experts"])
    ]
    domains = torch.randn(len(experts), 384, generator=torch.Generator().manual_seed(0))
    models = {
        "dense": seed,
        **{
            name: upcycle(seed, experts, domain_embeddings=domains, router="nexus", **opts)
            for name, opts in VARIANTS.items()
        },
    }
    return shape, models


def decode(model: Transformer, prompt: torch.Tensor, new: int) -> Callable[[], None]:
    """Greedy decoding of `new` tokens after `prompt` with the KV cache (prefill included)."""

    def run() -> None:
        generate(model, prompt, new)

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    shape, models = build(args)
    cfg = models["dense"].config
    repeats, warmup = (1, 0) if args.smoke else (5, 1) if args.quick else (9, 2)
    idx = torch.randint(0, cfg.vocab_size, (shape["batch"], cfg.max_seq_len + 1))
    prompt = idx[:1, : shape["prompt"]]
    moes = {k: v for k, v in models.items() if k != "dense"}
    train = measure({k: train_step(m, idx) for k, m in moes.items()}, repeats, warmup)
    for m in moes.values():
        m.eval().precompute_routers()
    infer = measure({k: forward(m, idx[:, :-1]) for k, m in moes.items()}, repeats, warmup)
    gen = measure({k: decode(m, prompt, shape["new"]) for k, m in moes.items()}, repeats, warmup)
    rows = []
    for name, model in models.items():
        row = {
            "model": name,
            "kv_bytes_per_token": KVCache(model.config, 1).bytes_per_token(),
            **{f"params_{k}": v for k, v in parameter_counts(model).items()},
        }
        if name in moes:
            row.update(
                train_ms=round(train[name].cpu_s * 1e3, 2),
                forward_ms=round(infer[name].cpu_s * 1e3, 2),
                decode_ms=round(gen[name].cpu_s * 1e3, 2),
                timing={"train": train[name], "forward": infer[name], "decode": gen[name]},
            )
        rows.append(row)
    base = "ffn-only"
    summary = {
        name: {
            "train_step_time": ratio(train[base], train[name]),
            "forward_time": ratio(infer[base], infer[name]),
            "decode_time": ratio(gen[base], gen[name]),
            "kv_bytes_per_token_over_dense": KVCache(models[name].config, 1).bytes_per_token()
            / KVCache(cfg, 1).bytes_per_token(),
        }
        for name in moes
        if name != base
    }
    print_table(
        "BAM vs FFN-only MoE (CPU ms, 1 thread)",
        rows,
        [
            "model",
            "train_ms",
            "forward_ms",
            "decode_ms",
            "kv_bytes_per_token",
            "params_total",
            "params_active_inference",
        ],
    )
    path = write_results("bam", args, {"shape": shape, "variants": VARIANTS}, rows, summary)
    print(f"summary (time ratios vs ffn-only, >1 = slower): {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
