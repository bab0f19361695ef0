"""`nexus import HF_DIR OUT_DIR` and `nexus export CHECKPOINT OUT_DIR`."""
from __future__ import annotations

import argparse

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
    from nexus.interop.hf_format import HF_CONFIG, read_json, tokenizer_files

    out = export_checkpoint(args.checkpoint, args.out_dir)
    arch = read_json(out / HF_CONFIG)["architectures"][0]
    tok = "with tokenizer" if tokenizer_files(out) else "without tokenizer files (none in the checkpoint)"
    print(f"exported {args.checkpoint} -> {out} as {arch}, {tok}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `import` and `export`."""
    imp = subparsers.add_parser(
        "import", help="import a transformers Llama directory (safetensors) as a Nexus checkpoint")
    imp.add_argument("hf_dir", help="local transformers model directory (config.json + safetensors)")
    imp.add_argument("out_dir", help="Nexus checkpoint directory to write (replaced atomically)")
    imp.add_argument("--dtype", choices=_DTYPES, default=None, help="weight dtype (default: as stored)")
    imp.add_argument("--like", default=None, metavar="CHECKPOINT",
                     help="refuse unless the model shares this seed's architecture and tokenizer files")
    imp.set_defaults(func=_run_import)

    exp = subparsers.add_parser(
        "export", help="export a Nexus checkpoint for transformers (dense: Llama, MoE: Qwen2-MoE)")
    exp.add_argument("checkpoint", help="Nexus checkpoint directory")
    exp.add_argument("out_dir", help="transformers model directory to write (replaced atomically)")
    exp.set_defaults(func=_run_export)
