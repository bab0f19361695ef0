"""`make gpu-check`: what must hold on a GPU, in one run of under 10 minutes on one GPU.

1. MoE layer parity: bf16 autocast vs fp32, and the grouped path vs the sorted one, output and
   gradients (relative errors);
2. sync-free MoE forward + backward: on CUDA under `torch.cuda.set_sync_debug_mode("error")`; on
   any device, the same op sequence for two token counts and no op that reads a device value back;
3. tokens/s and peak memory of a 470m-shaped layer (d_model 1024, ffn 2816, 6 routed experts, top-1,
   shared expert) against the dense FFN of the same active size, fwd + bwd in bf16;
4. a few bf16 training steps of the 470m Nexus MoE (the paper config: 256k vocabulary, gradient
   accumulation, chunked cross-entropy, activation checkpointing) through the stages' Trainer;
5. the micro pipeline end to end on the GPU (stages placed on it, evaluation on it).

`--cpu` runs the same checks on the CPU; `--smoke` shrinks every shape (the CI test runs
`--cpu --smoke`, without the pipeline, which the flow tests cover). Results go to
`benchmarks/results/gpu_check[-smoke].json`; the exit code is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, print_table, write_results

SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::bincount",
    "aten::nonzero",
    "aten::unique",
    "aten::_unique2",
    "aten::masked_select",
    "aten::repeat_interleave",
    "aten::equal",
}
"""aten ops whose output size or result needs a device value on the host."""
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
"""Tensor methods that copy a device value to the host (seen as torch functions, not aten ops)."""


def record_ops(fn: Callable[[], Any]) -> tuple[list[str], list[str]]:
    """(aten ops, torch functions/tensor methods) that `fn()` calls, in order."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Aten(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    class Functions(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Functions() as functions, Aten() as aten:
        fn()
    return aten.ops, functions.names


def moe_layer(d_model: int, hidden: int, n_experts: int, dispatch: str, device: str, top_k: int = 1):
    from nexus.config import MoEConfig
    from nexus.model.moe import MoELayer

    cfg = MoEConfig(
        expert_names=[f"e{i}" for i in range(n_experts)],
        router="nexus",
        top_k=top_k,
        dispatch=dispatch,
        router_hidden=d_model // 2,
    )
    torch.manual_seed(0)
    layer = MoELayer(d_model, hidden, cfg).to(device)
    with torch.no_grad():
        layer.experts.w_in.normal_(std=0.05)
        layer.experts.w_out.normal_(std=0.05)
    return layer


def fwd_bwd(layer, x, D, grad, autocast: bool):
    """Output and parameter gradients of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y, info = layer(x, D)
    torch.autograd.backward([y.float(), info.aux_loss], [grad, None])
    return y.float().detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_parity(device: str, shape: dict) -> dict:
    """bf16 vs fp32 and grouped vs sorted, for the layer output and the worst parameter gradient."""
    d, f, n, tokens = shape["d_model"], shape["hidden"], shape["experts"], shape["tokens"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, device=device, generator=g)
    D = torch.randn(n, 384, device=device, generator=g)
    grad = torch.randn(tokens, d, device=device, generator=g)
    sorted_layer, grouped = (moe_layer(d, f, n, k, device, top_k=2) for k in ("sorted", "grouped_mm"))
    runs = {
        (k, ac): fwd_bwd(layer, x, D, grad, ac)
        for k, layer in (("sorted", sorted_layer), ("grouped", grouped))
        for ac in (False, True)
    }
    out = {}
    for name, (a, b) in {
        "bf16_vs_fp32_grouped": (("grouped", True), ("grouped", False)),
        "bf16_vs_fp32_sorted": (("sorted", True), ("sorted", False)),
        "grouped_vs_sorted_fp32": (("grouped", False), ("sorted", False)),
        "grouped_vs_sorted_bf16": (("grouped", True), ("sorted", True)),
    }.items():
        (ya, ga), (yb, gb) = runs[a], runs[b]
        out[name] = {"output": _relative(ya, yb), "worst_gradient": max(_relative(ga[k], gb[k]) for k in gb)}
    # fp32 on CUDA runs the grouped GEMMs in bf16 (`grouped_dtype`): a bf16-sized tolerance there
    exact = 1e-4 if device == "cpu" else 3e-2
    ok = (
        out["grouped_vs_sorted_fp32"]["output"] < exact
        and out["bf16_vs_fp32_grouped"]["output"] < 3e-2
        and out["grouped_vs_sorted_bf16"]["output"] < 3e-2
        and all(v["worst_gradient"] < 6e-2 for v in out.values())
    )
    return {"ok": ok, **out}


def check_sync_free(device: str, shape: dict) -> dict:
    d, f, n = shape["d_model"], shape["hidden"], shape["experts"]
    layer = moe_layer(d, f, n, "grouped_mm", device, top_k=2)
    D = torch.randn(n, 384, device=device)

    def step(tokens: int) -> Callable[[], None]:
        x = torch.randn(tokens, d, device=device)

        def run() -> None:
            layer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                y, info = layer(x, D)
            (y.float().square().mean() + info.aux_loss).backward()

        return run

    step(shape["tokens"])()  # warm-up: lazy initialisation may sync once
    small, small_calls = record_ops(step(shape["tokens"]))
    large, _ = record_ops(step(4 * shape["tokens"]))
    result = {
        "same_ops_for_any_token_count": small == large,
        "ops": len(small),
        "syncing_ops": sorted(SYNCING_OPS & set(small)),
        "host_reads": sorted(HOST_READS & set(small_calls)),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(shape["tokens"])()
            result["cuda_sync_debug_error_mode"] = "clean"
        except RuntimeError as err:
            result["cuda_sync_debug_error_mode"] = f"failed: {err}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    result["ok"] = (
        result["same_ops_for_any_token_count"]
        and not result["syncing_ops"]
        and not result["host_reads"]
        and result.get("cuda_sync_debug_error_mode", "clean") == "clean"
    )
    return result


def _timed(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def check_throughput(device: str, shape: dict, repeats: int) -> dict:
    """Dense FFN (hidden 2f: the MoE's active FFN, shared + top-1) against the MoE layer, fwd + bwd."""
    from nexus.model.ffn import FeedForward

    d, f, n, tokens = shape["d_model"], shape["hidden"], shape["experts"], shape["tokens"]
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    D = torch.randn(n, 384, device=device)
    rows = {}
    candidates = {
        "dense": (FeedForward(d, 2 * f).to(device), lambda m: m(x)),
        "moe_grouped": (moe_layer(d, f, n, "grouped_mm", device), lambda m: m(x, D)[0]),
    }
    if device == "cpu":
        candidates["moe_sorted"] = (moe_layer(d, f, n, "sorted", device), lambda m: m(x, D)[0])
    for name, (module, call) in candidates.items():

        def run(module=module, call=call) -> None:
            module.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                y = call(module)
            y.float().square().mean().backward()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _timed(run, device, repeats)
        rows[name] = {
            "tokens_per_s": round(tokens / seconds),
            "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
        }
    rows["moe_vs_dense_throughput"] = round(
        rows["moe_grouped"]["tokens_per_s"] / rows["dense"]["tokens_per_s"], 3
    )
    return {"ok": True, **rows}


def check_training(device: str, smoke: bool) -> dict:
    """bf16 steps of the 470m Nexus MoE (paper config) with accumulation, chunked CE, checkpointing."""
    import lightning as L

    from flows.config import compose
    from nexus.model import Transformer, parameter_counts
    from nexus.training import CausalLMModule, MixtureDataModule
    from nexus.training.stages import build_trainer
    from nexus.training.synthetic import synthetic_splits

    cfg = compose("470m", check=False)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size)
    train = dataclasses.replace(
        cfg.train.moe,
        max_steps=3,
        batch_size=4,
        grad_accum_steps=2,
        val_every_n_steps=3,
        limit_val_batches=1,
        log_every_n_steps=1,
        progress_bar=False,
        accelerator="gpu" if device == "cuda" else "cpu",
        precision="bf16-mixed",
    )
    domains = [d.name for d in cfg.data.to_data_config("470m", "unused").domains]
    if smoke:  # the same code path on a model a CPU trains in seconds
        model_cfg = dataclasses.replace(
            model_cfg, vocab_size=512, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=64
        )
        train = dataclasses.replace(train, loss_chunk_tokens=64)
    moe_cfg = model_cfg.with_moe(expert_names=domains, router="nexus", **cfg.router.moe_kwargs())
    seq = model_cfg.max_seq_len
    data_train, data_val = synthetic_splits(domains, seq, model_cfg.vocab_size, n_train=16, n_val=4)
    dm = MixtureDataModule(
        data_train, data_val, dict.fromkeys(domains, 1.0), train.batch_size, train.max_steps
    )
    dm.micro_batches = train.grad_accum_steps
    L.seed_everything(0, verbose=False)
    model = Transformer(moe_cfg)
    counts = parameter_counts(model)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(train, Path(tmp))
        module = CausalLMModule(model, train, dm.domain_names)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    tokens = train.max_steps * train.batch_size * seq
    return {
        "ok": trainer.global_step == train.max_steps and all(math.isfinite(v) for v in metrics.values()),
        "parameters": counts["total"],
        "active_parameters": counts["active_training"],
        "steps": trainer.global_step,
        "tokens_per_s": round(tokens / seconds),
        "val_loss": metrics.get("val/loss"),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


def check_pipeline(device: str) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import upcycle_pipeline

    corpora = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpora"
    accelerator = (
        [] if device == "cuda" else [f"train.{s}.accelerator=cpu" for s in ("seed", "expert", "moe")]
    )
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness():
        t0 = time.perf_counter()  # on a GPU machine every stage is placed on it (flows/placement.py)
        summary = upcycle_pipeline(
            "micro",
            [
                f"out_dir={tmp}",
                f"data.corpora_dir={corpora}",
                f"data.cache_dir={tmp}/cache",
                "tracking.enabled=false",
                f"eval.device={'auto' if device == 'cuda' else 'cpu'}",
                *accelerator,
            ],
        )
        states = summary["states"]
    return {
        "ok": all(s == "Completed" for s in states.values()),
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": len(states),
        "perplexity_moe_nexus": summary["perplexity"].get("moe:nexus"),
    }


SHAPES = {
    "full": {"d_model": 1024, "hidden": 2816, "experts": 6, "tokens": 16384},
    "smoke": {"d_model": 32, "hidden": 48, "experts": 6, "tokens": 64},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; no pipeline")
    p.add_argument("--out", default=RESULTS_DIR, type=Path)
    args = p.parse_args(argv)
    args.quick = False
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    shape = SHAPES["smoke" if args.smoke or device == "cpu" else "full"]
    results: dict[str, dict] = {}
    checks: dict[str, Callable[[], dict]] = {
        "parity": lambda: check_parity(device, shape),
        "sync_free": lambda: check_sync_free(device, shape),
        "throughput": lambda: check_throughput(device, shape, repeats=2 if args.smoke else 10),
        "training": lambda: check_training(device, smoke=args.smoke or device == "cpu"),
    }
    if not args.smoke:
        checks["pipeline"] = lambda: check_pipeline(device)
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as err:
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {results[name]}", flush=True)
    rows = [{"check": k, "ok": v["ok"], "seconds": v["seconds"]} for k, v in results.items()]
    print_table(f"GPU check on {device}", rows, ["check", "ok", "seconds"])
    info = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "shape": shape,
    }
    write_results("gpu_check", args, info, rows, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main().values()) else 1)
