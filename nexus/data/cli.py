"""`nexus data prepare`: build an experiment's documents, tokenizer, packed splits and domain
embeddings, then print documents/tokens/bytes per domain and split, the embeddings' cosine
similarities and the wall time of each stage (with whether it was reused from the cache)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare domain corpora, tokenizer, packing, embeddings")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("--experiment", default="demo", help="preset: demo (Debian packages) or tiny (fixtures)")
    p.add_argument("--out", type=Path, help="data directory (default outputs/data/<experiment>)")
    p.add_argument("--cache-dir", type=Path, help="download cache (default .cache/nexus)")
    p.add_argument(
        "--corpora",
        type=Path,
        default=Path("tests/fixtures/corpora"),
        help="fixture corpora root for --experiment tiny",
    )
    p.add_argument(
        "--new-domain",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="add a held-out folder/glob domain (.txt/.md/.jsonl), e.g. for an extension run",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text of --new-domain files")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--num-proc", type=int)
    p.add_argument("--embed-sample", type=int, help="documents per domain embedding")
    p.add_argument("--embedder", help="sentence-transformers model name or path (default: all-MiniLM-L6-v2)")
    p.add_argument("--no-embeddings", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=run_prepare)


def build_config(args: argparse.Namespace):
    """The experiment's DataConfig with the command-line overrides applied."""
    from nexus.data.config import DomainConfig
    from nexus.data.presets import preset
    from nexus.errors import ConfigError

    kwargs = {"corpora_dir": args.corpora} if args.experiment == "tiny" else {}
    cfg = preset(args.experiment, **kwargs)
    if args.out:
        cfg = replace(cfg, out_dir=str(args.out))
    if args.cache_dir:
        cfg = replace(cfg, cache_dir=str(args.cache_dir))
    extra = []
    for spec in args.new_domain:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ConfigError(f"--new-domain {spec!r}: expected NAME=PATH")
        extra.append(DomainConfig.folder(name, path, text_field=args.text_field, held_out=True))
    overrides = {
        "tokenizer": {"vocab_size": args.vocab_size},
        "packing": {"seq_len": args.seq_len, "num_proc": args.num_proc},
        "embedding": {
            "sample_size": args.embed_sample,
            "model": args.embedder,
            "enabled": False if args.no_embeddings else None,
        },
    }
    changes = {
        section: replace(getattr(cfg, section), **{k: v for k, v in fields.items() if v is not None})
        for section, fields in overrides.items()
    }
    return replace(cfg, domains=cfg.domains + tuple(extra), **changes)


def run_prepare(args: argparse.Namespace) -> int:
    from nexus.data.prepare import prepare_experiment
    from nexus.data.prepared import format_report

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = build_config(args)
    data = prepare_experiment(cfg, progress=not args.quiet)
    print(
        f"experiment {data.experiment}: {data.out_dir}  (tokenizer {data.tokenizer_path}, seq_len {data.seq_len})"
    )
    print(format_report(data))
    print(
        "\nstages: "
        + ", ".join(
            f"{stage} {secs:.1f}s ({'reused' if data.reused.get(stage) else 'built'})"
            for stage, secs in data.timings.items()
            if stage != "total"
        )
    )
    print(f"wall time: {data.timings['total']:.1f}s")
    return 0
