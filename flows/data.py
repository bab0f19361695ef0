"""`nexus data prepare`: build an experiment's documents, tokenizer, packed splits and embeddings.

The experiment is composed like every flow's config (flows.config.compose: conf/ + Hydra overrides) and
prepared like the pipeline's data task (`prepare_section`); the command prints documents/tokens/bytes
per domain and split, the embeddings' cosine similarities and the wall time of each stage (with
whether it was reused from the cache)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from flows.config import DataSection


def prepare_section(
    section: DataSection,
    experiment: str,
    out_dir: str,
    keep: list[str] | None = None,
    extra: dict[str, str] | None = None,
    tokenizer_path: str | None = None,
    embeddings: bool = False,
) -> tuple[Any, Any]:
    """Prepare the section's documents, tokenizer and packed splits under `out_dir/main` (and the domain
    embeddings with `embeddings`): a tokenizer is trained on `tokenizer_domains` first (`out_dir/
    tokenizer-base`), then used for every domain, so adding a domain later does not change any other
    domain's tokens. Every source is checked before anything is written. Returns (PreparedData, the
    DataConfig)."""
    from nexus.data import prepare_experiment
    from nexus.data.sources import check_sources, source_identity

    main = section.to_data_config(experiment, str(Path(out_dir) / "main"), extra=extra, keep=keep)
    check_sources([s for d in main.domains for s in d.sources])
    for domain in main.domains:
        for src in domain.sources:
            source_identity(src, domain.name)
    tokenizer = tokenizer_path or section.tokenizer.path
    if not tokenizer and section.tokenizer_domains:
        base = section.to_data_config(
            experiment, str(Path(out_dir) / "tokenizer-base"), keep=list(section.tokenizer_domains)
        )
        base = _with_embeddings(base, False)
        tokenizer = str(prepare_experiment(base, base.out_dir, progress=False).tokenizer_path)
    cfg = _with_embeddings(
        section.to_data_config(
            experiment, str(Path(out_dir) / "main"), extra=extra, keep=keep, tokenizer_path=tokenizer
        ),
        embeddings,
    )
    return prepare_experiment(cfg, cfg.out_dir, progress=False), cfg


def _with_embeddings(cfg: Any, enabled: bool) -> Any:
    return dataclasses.replace(cfg, embedding=dataclasses.replace(cfg.embedding, enabled=enabled))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare domain corpora, tokenizer, packing, embeddings")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value (as `nexus run`)")
    p.add_argument("--experiment", default="demo", help="an experiment of conf/experiment/ (as `nexus run`)")
    p.add_argument("--out", type=Path, help="data directory (default <out_dir>/data, the pipeline's)")
    p.add_argument("--no-embeddings", action="store_true", help="skip the domain embeddings")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from flows.config import compose
    from flows.home import offline_env
    from nexus.data.prepared import format_report

    cfg = compose(args.experiment, args.overrides)  # the flows' checks: folders, domains, sizes
    offline_env(cfg.home)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    out = str(args.out or Path(cfg.out_dir) / "data")
    data, _ = prepare_section(cfg.data, cfg.name, out, embeddings=not args.no_embeddings)
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
