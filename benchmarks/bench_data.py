"""Data path: tokenization + packing throughput (tokens/s by `num_proc`), and how long a training
step waits for its next batch from the packed, memory-mapped loader (`MixtureDataModule`).

Synthetic documents (random words) keep it offline and deterministic; the tokenizer is a
byte-level BPE trained on them (`nexus.data.tokenizer.train_tokenizer`).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train_step import build_models, model_configs, train_step
from benchmarks.common import parser, print_table, setup, write_results


def synthetic_docs(n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    return [" ".join(rng.choices(vocab, k=words_per_doc)) for _ in range(n_docs)]


def main(argv: list[str] | None = None) -> dict:
    import datasets

    from nexus.data.packing import PackedSplit, pack_documents
    from nexus.data.tokenizer import train_tokenizer
    from nexus.training.datamodule import MixtureDataModule

    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    datasets.disable_progress_bars()
    n_docs = 200 if args.smoke else 2000 if args.quick else 8000
    texts = synthetic_docs(n_docs, 300)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(texts[:500], vocab_size=2048, out_path=Path(tmp) / "tokenizer.json")
        docs = datasets.Dataset.from_dict({"text": texts})
        packed = Path(tmp) / "packed-1"
        for num_proc in (1, 2):
            out = Path(tmp) / f"packed-{num_proc}"
            t0 = time.perf_counter()
            counts = pack_documents(
                docs,
                tok,
                out,
                domain="synthetic",
                split="train",
                fingerprint=f"bench{num_proc}",
                eos_id=0,
                vocab_size=2048,
                num_proc=num_proc,
            )
            wall = time.perf_counter() - t0
            n_tokens = counts["tokens"]
            rows.append(
                {
                    "stage": f"tokenize+pack num_proc={num_proc}",
                    "tokens": n_tokens,
                    "seconds": round(wall, 3),
                    "tok_s": round(n_tokens / wall),
                }
            )
        shape, configs = model_configs(args)
        seq_len = configs["dense"].max_seq_len
        split = PackedSplit(packed, seq_len)
        steps = 3 if args.smoke else 20
        dm = MixtureDataModule(
            {"synthetic": split},
            {},
            {"synthetic": 1.0},
            batch_size=shape["batch"],
            max_steps=steps,
            num_workers=0,
        )
        model = build_models(configs)["nexus"]
        step = train_step(model, torch.zeros(1, seq_len + 1, dtype=torch.long))
        it = iter(dm.train_dataloader())
        wait = compute = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch, _domains = next(it)
            t1 = time.perf_counter()
            step(batch.clamp_max(configs["dense"].vocab_size - 1))
            wait, compute = wait + t1 - t0, compute + time.perf_counter() - t1
        rows.append(
            {
                "stage": f"loader wait per step (batch {shape['batch']}x{seq_len})",
                "seconds": round(wait / steps, 6),
                "share_of_step": round(wait / (wait + compute), 4),
            }
        )
    summary = {
        "pack_tok_s": {r["stage"]: r["tok_s"] for r in rows if "tok_s" in r},
        "loader_wait_share_of_step": rows[-1]["share_of_step"],
    }
    print_table("Data path", rows, ["stage", "tokens", "seconds", "tok_s", "share_of_step"])
    path = write_results("data", args, {"n_docs": n_docs, "words_per_doc": 300}, rows, summary)
    print(f"summary: {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
