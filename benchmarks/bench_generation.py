"""Greedy generation tokens/s: Nexus with the KV cache vs without it, and vs transformers' `generate`
on the export (the remote-code NexusForCausalLM with its DynamicCache), dense and Nexus MoE.

Parallel blocks (the paper's), MoE = 4 routed experts, top-1, shared expert, Nexus router. Each
candidate decodes the same prompt; before timing, the three outputs are checked to be identical.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

from benchmarks.common import measure, parser, print_table, ratio, setup, write_results
from nexus.config import ModelConfig, tiny
from nexus.evaluation.generation import generate
from nexus.interop import export_hf
from nexus.model.transformer import Transformer
from nexus.upcycling import upcycle

FULL = {
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 4,
    "ffn_hidden": 512,
    "vocab_size": 4096,
    "max_seq_len": 512,
    "batch": 1,
    "prompt": 64,
    "new": 128,
    "n_experts": 4,
}
QUICK = {**FULL, "n_layers": 2, "new": 64}


def build(args) -> tuple[dict, dict[str, Transformer]]:
    """The dense seed and a Nexus MoE upcycled from it and n re-initialised experts."""
    if args.smoke:
        shape = {"batch": 1, "prompt": 8, "new": 8, "n_experts": 2}
        config = tiny(max_seq_len=64)
    else:
        shape = QUICK if args.quick else FULL
        config = ModelConfig(
            **{k: v for k, v in shape.items() if k not in ("batch", "prompt", "new", "n_experts")}
        )
    seed = Transformer(config).reinit_(torch.Generator().manual_seed(0))
    experts = [
        Transformer(config).reinit_(torch.Generator().manual_seed(i + 1)) for i in range(shape["n_experts"])
    ]
    moe = upcycle(
        seed, experts, domain_embeddings=torch.randn(shape["n_experts"], 32), router="nexus", top_k=1
    )
    return shape, {"dense": seed.eval(), "moe": moe.eval()}


def candidates(
    model: Transformer, prompt: torch.Tensor, new: int, tmp: str
) -> dict[str, Callable[[], torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp), trust_remote_code=True).eval()

    def ours(use_cache: bool) -> Callable[[], torch.Tensor]:
        return lambda: generate(model, prompt, new, use_cache=use_cache)

    def transformers() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return {"cached": ours(True), "uncached": ours(False), "transformers": transformers}


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    shape, models = build(args)
    rows, summary = [], {}
    for name, model in models.items():
        prompt = torch.randint(
            0,
            model.config.vocab_size,
            (shape["batch"], shape["prompt"]),
            generator=torch.Generator().manual_seed(1),
        )
        with tempfile.TemporaryDirectory() as tmp:
            cands = candidates(model, prompt, shape["new"], tmp)
            outputs = {k: fn() for k, fn in cands.items()}
            identical = all(torch.equal(outputs["cached"], o) for o in outputs.values())
            t = measure(
                cands, repeats=1 if args.smoke else 3 if args.quick else 5, warmup=0 if args.smoke else 1
            )
        new_tokens = shape["batch"] * shape["new"]
        rows += [
            {
                "model": name,
                "decoder": k,
                "tok_s": round(new_tokens / tm.wall_s, 1),
                "cpu_tok_s": round(new_tokens / tm.cpu_s, 1),
                "identical": identical,
                "timing": tm,
            }
            for k, tm in t.items()
        ]
        summary[name] = {
            "cached_over_uncached": ratio(t["cached"], t["uncached"]),
            "cached_over_transformers": ratio(t["cached"], t["transformers"]),
            "outputs_identical": identical,
        }
    print_table(
        "Greedy generation (new tokens/s)", rows, ["model", "decoder", "tok_s", "cpu_tok_s", "identical"]
    )
    path = write_results(
        "generation", args, {"shape": shape, "model": models["moe"].config.to_dict()}, rows, summary
    )
    print(f"summary (throughput ratios, >1 = the cached decoder is faster): {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
