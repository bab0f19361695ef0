"""Peak memory of data preparation against input size: an `hf` domain on a local `save_to_disk`
dataset (declared as `+data.hf.big={path: ...}`, as a user would), prepared by the pipeline's data
task (read, split, tokenize, pack) in a fresh process, at several input sizes.

The input is built from the fixture corpora by repetition with variation: every document is a
random draw of their paragraphs with a unique counter line, so no two are duplicates (~3 kB each).
Memory is sampled every 100 ms: the peak anonymous resident memory (`RssAnon`: heap, what the
process allocated) of the preparing process and of it with its children (the `num_proc` tokenizer
workers), and its peak RSS, which also counts the pages of memory-mapped files it has read (the
documents and token streams, clean pages the kernel drops under pressure).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parser, print_table, write_results

CORPORA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpora"
FULL_MB, QUICK_MB, SMOKE_MB = [100, 400], [25, 100], [1, 4]

CHILD = """
import json, sys
from flows.config import as_dict, compose
from flows.tasks import prepare_data
out, saved, num_proc = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = compose("micro", [f"out_dir={out}", f"data.cache_dir={out}/cache", "tracking.enabled=false",
                        f"+data.hf.big={{path:{saved}}}", "data.domains=[big]", "data.tokenizer_domains=[big]",
                        "data.seed_domains=[big]", "data.vocab_size=4096", "data.seq_len=256", "model.max_seq_len=256",
                        f"data.num_proc={num_proc}"])
result = prepare_data.fn(data=as_dict(cfg.data), experiment=cfg.name, out_dir=f"{out}/data")
print("RESULT", json.dumps({"tokens": sum(result.token_counts.values())}))
"""


def paragraphs() -> list[str]:
    texts = [
        p.read_text(errors="replace") for p in sorted(CORPORA.rglob("*")) if p.is_file() and p.suffix != ".md"
    ]
    return [t.strip() for text in texts for t in text.split("\n\n") if len(t.strip()) > 40]


def build_input(megabytes: int, out: Path, seed: int = 0) -> int:
    """A `save_to_disk` dataset of ~`megabytes` MB of unique documents; returns their count."""
    import datasets

    rng, pool = random.Random(seed), paragraphs()
    jsonl, n, size = out.with_suffix(".jsonl"), 0, 0
    with open(jsonl, "w") as f:
        while size < megabytes * 1e6:
            text = f"document {n}\n\n" + "\n\n".join(rng.choices(pool, k=12))
            f.write(json.dumps({"text": text}) + "\n")
            size, n = size + len(text.encode()), n + 1
    datasets.load_dataset(
        "json", data_files=str(jsonl), split="train", cache_dir=str(out.parent / "hf-cache")
    ).save_to_disk(str(out))
    jsonl.unlink()
    return n


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_memory(cmd: list[str]) -> tuple[dict[str, float], float, str]:
    """({anon, anon_with_workers, rss} peaks in MB, seconds, stdout) of running `cmd`."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), {"anon": 0, "anon_with_workers": 0, "rss": 0}
    while proc.poll() is None:
        try:
            anon = [_rss_anon(p.pid) for p in [root, *root.children(recursive=True)]]
            peak = {
                "anon": max(peak["anon"], anon[0]),
                "anon_with_workers": max(peak["anon_with_workers"], sum(anon)),
                "rss": max(peak["rss"], root.memory_info().rss),
            }
        except (psutil.Error, OSError):
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"data preparation failed:\n{out[-3000:]}")
    return {k: v / 1e6 for k, v in peak.items()}, time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="input sizes in MB")
    p.add_argument("--num-proc", type=int, default=2)
    args = p.parse_args(argv)
    sizes = args.sizes or (SMOKE_MB if args.smoke else QUICK_MB if args.quick else FULL_MB)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            saved = Path(tmp) / f"input-{mb}mb"
            n_docs = build_input(mb, saved)
            peak, seconds, out = peak_memory(
                [sys.executable, "-c", CHILD, str(Path(tmp) / f"out-{mb}"), str(saved), str(args.num_proc)]
            )
            tokens = json.loads(out.rsplit("RESULT", 1)[1])["tokens"]
            rows.append(
                {
                    "input_mb": mb,
                    "documents": n_docs,
                    "tokens": tokens,
                    "seconds": round(seconds, 1),
                    **{f"peak_{k}_mb": round(v) for k, v in peak.items()},
                }
            )
    columns = ["peak_anon_mb", "peak_anon_with_workers_mb", "peak_rss_mb"]
    summary = {
        "sizes_mb": sizes,
        **{c: [r[c] for r in rows] for c in columns},
        "anon_growth": round(rows[-1]["peak_anon_mb"] / rows[0]["peak_anon_mb"], 3),
        "input_growth": sizes[-1] / sizes[0],
    }
    print_table("Data preparation memory", rows, ["input_mb", "documents", "tokens", "seconds", *columns])
    path = write_results("data_memory", args, {"num_proc": args.num_proc}, rows, summary)
    print(f"summary: {summary}\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
