"""MoE layer fwd+bwd tokens/s: Nexus's MoELayer (shared + n routed, top-k) against

- `dense`: the dense-equivalent SwiGLU FFN, hidden (1 + k)·f: same active parameters and FLOPs;
- `hf`: transformers' eager `Qwen2MoeSparseMoeBlock` loaded with the same weights (its sigmoid
  shared-expert gate is zeroed and the shared down projection doubled, so it computes the same y);
- `peak`: the dense-equivalent's six fwd+bwd GEMMs alone (`torch.mm(out=)`), i.e. this machine's
  fp32 GEMM peak at these shapes; achieved GFLOP/s = the layer's useful FLOPs / its time.

All candidates of one (d_model, tokens, top_k) are timed interleaved in one `measure` call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import Timing, measure, parser, print_table, ratio, setup, write_results
from nexus.config import MoEConfig
from nexus.model.ffn import FeedForward
from nexus.model.moe import MoELayer

FULL = dict(d_model=[256, 512], tokens=[2048, 8192, 32768], n_experts=[4, 8, 16], top_k=[1, 2])
QUICK = dict(d_model=[256], tokens=[2048, 8192], n_experts=[8, 16], top_k=[1, 2])
SMOKE = dict(d_model=[32], tokens=[256], n_experts=[4], top_k=[1, 2])


def repeats_for(tokens: int, args: argparse.Namespace) -> tuple[int, int]:
    """(warmup, repeats): one cold call at 32k tokens (its buffers are fresh mmaps every call anyway),
    so the full sweep fits in its time budget."""
    if args.smoke:
        return 0, 1
    return (1, 5) if tokens <= 2048 else (1, 2) if tokens <= 8192 else (0, 1)


def hf_block(layer: MoELayer) -> nn.Module:
    """transformers' Qwen2-MoE sparse block (eager experts) computing exactly `layer`'s function."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    n, two_f, d = layer.experts.w_in.shape
    cfg = Qwen2MoeConfig(
        hidden_size=d,
        moe_intermediate_size=two_f // 2,
        shared_expert_intermediate_size=two_f // 2,
        num_experts=n,
        num_experts_per_tok=layer.config.top_k,
        norm_topk_prob=layer.config.normalize_gates,
        hidden_act="silu",
    )
    cfg._experts_implementation = "eager"
    block = Qwen2MoeSparseMoeBlock(cfg)
    gate, up = layer.shared.w_in.weight.detach().chunk(2)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_in)
        block.experts.down_proj.copy_(layer.experts.w_out)
        block.shared_expert.gate_proj.weight.copy_(gate)
        block.shared_expert.up_proj.weight.copy_(up)
        block.shared_expert.down_proj.weight.copy_(2 * layer.shared.w_out.weight)  # sigmoid(0) = 1/2
        block.shared_expert_gate.weight.zero_()
    return block


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    """One training-style call: forward, backward, gradients dropped as `zero_grad()` does."""

    def run() -> None:
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad_y)
        module.zero_grad(set_to_none=True)
        x.grad = None

    return run


class _HF(nn.Module):
    """The transformers block, which wants (batch, seq, d_model), on (tokens, d_model)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)


def gemm_peak(tokens: int, d: int, hidden: int) -> Callable[[], None]:
    """The dense-equivalent FFN's six fwd+bwd GEMMs into preallocated outputs: no elementwise work."""
    x, g = torch.randn(tokens, d), torch.randn(tokens, d)
    w_in, w_out = torch.randn(2 * hidden, d), torch.randn(d, hidden)
    h, a = torch.empty(tokens, 2 * hidden), torch.randn(tokens, hidden)
    y, dw_in, dw_out, gx = (
        torch.empty(tokens, d),
        torch.empty(2 * hidden, d),
        torch.empty(d, hidden),
        torch.empty(tokens, d),
    )

    def run() -> None:
        torch.mm(x, w_in.t(), out=h)  # forward W_in
        torch.mm(a, w_out.t(), out=y)  # forward W_out
        torch.mm(g.t(), a, out=dw_out)  # dW_out
        torch.mm(g, w_out, out=a)  # d act
        torch.mm(h.t(), x, out=dw_in)  # dW_in
        torch.mm(h, w_in, out=gx)  # dx

    return run


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ffn-mult", type=float, default=1.0, help="expert hidden f = ffn_mult · d_model")
    p.add_argument(
        "--profile",
        nargs=4,
        type=int,
        metavar=("D_MODEL", "TOKENS", "N", "K"),
        help="instead of the sweep: torch.profiler table of our layer and the dense-equivalent at one shape",
    )
    args = p.parse_args(argv)
    setup(args)
    if args.profile:
        return profile(*args.profile, args.ffn_mult)
    sweep = SMOKE if args.smoke else QUICK if args.quick else FULL
    rows: list[dict] = []
    for d in sweep["d_model"]:
        f = int(args.ffn_mult * d)
        for tokens in sweep["tokens"]:
            for k in sweep["top_k"]:
                x = torch.randn(tokens, d, requires_grad=True)
                grad_y = torch.randn(tokens, d)
                flops = 18 * tokens * d * (1 + k) * f  # fwd+bwd GEMMs of the active parameters
                cands = {
                    "dense": fwd_bwd(FeedForward(d, (1 + k) * f), x, grad_y),
                    "peak": gemm_peak(tokens, d, (1 + k) * f),
                }
                for n in sweep["n_experts"]:
                    cfg = MoEConfig(expert_names=[f"e{i}" for i in range(n)], router="linear", top_k=k)
                    layer = MoELayer(d, f, cfg)
                    hf = _HF(hf_block(layer))
                    with torch.no_grad():
                        torch.testing.assert_close(hf(x[:64]), layer(x[:64])[0], rtol=1e-4, atol=1e-5)
                    cands[f"nexus{n}"], cands[f"hf{n}"] = fwd_bwd(layer, x, grad_y), fwd_bwd(hf, x, grad_y)
                warmup, repeats = repeats_for(tokens, args)
                t: dict[str, Timing] = measure(cands, repeats, warmup)
                peak = flops / t["peak"].wall_s / 1e9
                for n in sweep["n_experts"]:
                    ours, hf_t = t[f"nexus{n}"], t[f"hf{n}"]
                    rows.append(
                        {
                            "d_model": d,
                            "ffn": f,
                            "tokens": tokens,
                            "n": n,
                            "k": k,
                            "tok_s": round(tokens / ours.wall_s),
                            "dense_tok_s": round(tokens / t["dense"].wall_s),
                            "hf_tok_s": round(tokens / hf_t.wall_s),
                            "vs_dense": ratio(ours, t["dense"])["wall"],
                            "vs_dense_cpu": ratio(ours, t["dense"])["cpu"],
                            "vs_hf": ratio(ours, hf_t)["wall"],
                            "vs_hf_cpu": ratio(ours, hf_t)["cpu"],
                            "gflops": round(flops / ours.wall_s / 1e9, 1),
                            "peak_gflops": round(peak, 1),
                            "of_peak": round(t["peak"].wall_s / ours.wall_s, 3),
                            "of_peak_cpu": round(t["peak"].cpu_s / ours.cpu_s, 3),
                            "timings": {"nexus": ours, "dense": t["dense"], "hf": hf_t, "peak": t["peak"]},
                        }
                    )
                print(
                    f"  d={d} tokens={tokens} k={k}: "
                    + ", ".join(
                        f"n={r['n']} {r['vs_dense']:.2f}x dense {r['vs_hf']:.2f}x hf"
                        for r in rows[-len(sweep["n_experts"]) :]
                    ),
                    flush=True,
                )
    cols = [
        "d_model",
        "tokens",
        "n",
        "k",
        "tok_s",
        "vs_dense",
        "vs_dense_cpu",
        "vs_hf",
        "vs_hf_cpu",
        "gflops",
        "peak_gflops",
        "of_peak",
        "of_peak_cpu",
    ]
    print_table("MoE layer fwd+bwd (shared expert + n routed, top-k), fp32", rows, cols)
    summary = summarize(rows)
    path = write_results(
        "moe_layer",
        args,
        {"sweep": sweep, "ffn_mult": args.ffn_mult, "flops": "18·T·d·(1+k)·f"},
        rows,
        summary,
    )
    print(f"summary: {summary}\nwrote {path}")
    return summary


def profile(d: int, tokens: int, n: int, k: int, ffn_mult: float = 1.0, steps: int = 5) -> dict:
    """Where the time goes: self CPU time per op over `steps` fwd+bwd calls, ours vs dense-equivalent."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    f = int(ffn_mult * d)
    x, grad_y = torch.randn(tokens, d, requires_grad=True), torch.randn(tokens, d)
    layer = MoELayer(d, f, MoEConfig(expert_names=[f"e{i}" for i in range(n)], router="linear", top_k=k))
    out = {}
    for name, module in {"nexus": layer, "dense": FeedForward(d, (1 + k) * f)}.items():
        run = fwd_bwd(module, x, grad_y)
        run()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"\n## {name}: d_model {d}, {tokens} tokens, {n} experts, top-{k}\n{table}")
        out[name] = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e3
    print(f"ms per fwd+bwd: {out}; MoE / dense time: {out['nexus'] / out['dense']:.3f}")
    return out


def summarize(rows: list[dict]) -> dict:
    """The issue's targets: vs dense (top-1, n ≥ 8, at 2k and ≥ 8k tokens), vs peak, vs transformers."""

    def worst(key: str, pick) -> float | None:
        vals = [r[key] for r in rows if pick(r)]
        return min(vals) if vals else None

    top1 = lambda r: r["k"] == 1 and r["n"] >= 8  # noqa: E731
    return {
        "min_vs_dense_top1_2k": worst("vs_dense", lambda r: top1(r) and r["tokens"] <= 2048),
        "min_vs_dense_top1_ge8k": worst("vs_dense", lambda r: top1(r) and r["tokens"] >= 8192),
        "min_vs_dense_cpu_top1_2k": worst("vs_dense_cpu", lambda r: top1(r) and r["tokens"] <= 2048),
        "min_vs_dense_cpu_top1_ge8k": worst("vs_dense_cpu", lambda r: top1(r) and r["tokens"] >= 8192),
        "min_of_peak_top1": worst("of_peak", top1),
        "min_of_peak_cpu_top1": worst("of_peak_cpu", top1),
        "min_vs_hf_n16": worst("vs_hf", lambda r: r["n"] == 16),
        "min_vs_hf_cpu_n16": worst("vs_hf_cpu", lambda r: r["n"] == 16),
        "min_vs_hf_all": worst("vs_hf", lambda r: True),
        "min_vs_hf_cpu_all": worst("vs_hf_cpu", lambda r: True),
    }


if __name__ == "__main__":
    main()
