"""`nexus import HF_DIR OUT_DIR` and `nexus export CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def _run_import(args: argparse.Namespace) -> int:
    import torch

    from nexus.interop.hf_import import import_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = import_hf(args.hf_dir, args.out_dir, dtype=dtype, like=args.like)
    print(f"imported {args.hf_dir} -> {out}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from nexus.interop.hf_export import export_checkpoint
    from nexus.interop.hf_format import HF_CONFIG, NEXUS, read_json, tokenizer_files

    results = [read_json(Path(path)) for path in args.results]
    out = export_checkpoint(args.checkpoint, args.out_dir, remote_code=args.remote_code, results=results)
    arch = read_json(out / HF_CONFIG)["architectures"][0]
    how = " (remote code: load with trust_remote_code=True)" if arch == NEXUS else ""
    tok = "with tokenizer" if tokenizer_files(out) else "without tokenizer files (none in the checkpoint)"
    print(f"exported {args.checkpoint} -> {out} as {arch}{how}, {tok}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `import` and `export`."""
    imp = subparsers.add_parser(
        "import",
        help="import a transformers directory (Llama, Mistral, Qwen2, or any `nexus export`) "
        "as a Nexus checkpoint",
    )
    imp.add_argument("hf_dir", help="local transformers model directory (config.json + safetensors)")
    imp.add_argument("out_dir", help="Nexus checkpoint directory to write (replaced atomically)")
    imp.add_argument("--dtype", choices=_DTYPES, default=None, help="weight dtype (default: as stored)")
    imp.add_argument(
        "--like",
        default=None,
        metavar="CHECKPOINT",
        help="refuse unless the model shares this seed's architecture and tokenizer files",
    )
    imp.set_defaults(func=_run_import)

    exp = subparsers.add_parser(
        "export",
        help="export a Nexus checkpoint for transformers (Llama / Qwen2 / Qwen2-MoE where exact, "
        "else the remote-code NexusForCausalLM), with a model card",
    )
    exp.add_argument("checkpoint", help="Nexus checkpoint directory")
    exp.add_argument("out_dir", help="transformers model directory to write (replaced atomically)")
    exp.add_argument(
        "--remote-code",
        action="store_true",
        help="always export as NexusForCausalLM (remote code), also for sequential-block models",
    )
    exp.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="JSON",
        help="lm-eval results (e.g. from `nexus eval`) for the model card; repeatable",
    )
    exp.set_defaults(func=_run_export)
