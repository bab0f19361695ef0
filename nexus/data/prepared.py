"""`PreparedData`: what `prepare_experiment` built, and how later stages open it.

Layout of an experiment's data directory (`open_prepared(dir)` reads `manifest.json`):
    manifest.json                     domains, splits, counts, fingerprints, seq_len
    tokenizer/tokenizer.json          the experiment's tokenizer
    documents/<domain>/               datasets.DatasetDict (train/validation/test: text, doc_id, origin)
    packed/<domain>/<split>/          token stream (see nexus.data.packing.PackedSplit)
    embeddings/<domain>.safetensors   d_i with metadata (see nexus.data.embeddings)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexus.data.documents import SPLITS
from nexus.data.embeddings import SUFFIX, cosine_similarity, load_domain_embeddings
from nexus.data.packing import PackedSplit
from nexus.errors import DataError
from nexus.io import atomic_write_text

MANIFEST = "manifest.json"


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0


@dataclass
class DomainData:
    name: str
    held_out: bool
    fingerprint: str  # of the domain's documents (sources + versions + recipe)
    splits: dict[str, SplitStats] = field(default_factory=dict)


@dataclass
class PreparedData:
    """Handle on a prepared experiment. Typical use in training code:

    data = open_prepared("outputs/data/demo")
    tok = data.load_tokenizer()                       # eos: tok.eos_token_id, vocab: len(tok)
    train = data.packed("kernel-docs", "train")       # PackedSplit, items (seq_len + 1,) int64
    names, D, meta = data.domain_embeddings(data.initial_domains)   # D: (n, m) float32
    """

    out_dir: Path
    experiment: str
    seq_len: int
    tokenizer_fingerprint: str
    domains: dict[str, DomainData]
    embedding_dim: int | None = None
    embedder: str | None = None
    # Of the run that returned this object (not reloaded by open_prepared): seconds per stage and
    # whether each stage was reused from the cache.
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.out_dir / "tokenizer" / "tokenizer.json"

    @property
    def initial_domains(self) -> list[str]:
        return [d.name for d in self.domains.values() if not d.held_out]

    @property
    def held_out_domains(self) -> list[str]:
        return [d.name for d in self.domains.values() if d.held_out]

    def _domain(self, name: str) -> DomainData:
        if name not in self.domains:
            raise DataError(
                f"domain {name!r} is not in experiment {self.experiment!r} ({self.out_dir}); "
                f"known: {list(self.domains)}"
            )
        return self.domains[name]

    def load_tokenizer(self):
        from nexus.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def packed(self, domain: str, split: str = "train", seq_len: int | None = None) -> PackedSplit:
        self._domain(domain)
        if split not in SPLITS:
            raise DataError(f"domain {domain!r}: split {split!r} is not one of {SPLITS}")
        return PackedSplit(self.out_dir / "packed" / domain / split, seq_len or self.seq_len)

    def packed_splits(self, split: str = "train", domains: list[str] | None = None) -> dict[str, PackedSplit]:
        return {d: self.packed(d, split) for d in (domains or list(self.domains))}

    def documents(self, domain: str):
        """The domain's `datasets.DatasetDict` of documents."""
        from datasets import load_from_disk

        self._domain(domain)
        return load_from_disk(str(self.out_dir / "documents" / domain))

    def embedding_path(self, domain: str) -> Path:
        return self.out_dir / "embeddings" / f"{domain}{SUFFIX}"

    def domain_embeddings(self, domains: list[str] | None = None):
        """`(names, tensor (n, m) float32, metadata)` for `domains` (default: all, config order)."""
        names = domains or list(self.domains)
        for name in names:
            self._domain(name)
        return load_domain_embeddings(self.out_dir / "embeddings", names)

    def token_counts(self, split: str = "train") -> dict[str, int]:
        return {d.name: d.splits[split].tokens for d in self.domains.values()}

    def similarity(self) -> tuple[list[str], Any]:
        names, matrix, _ = self.domain_embeddings()
        return names, cosine_similarity(matrix.numpy())

    def save(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k not in ("timings", "reused", "out_dir")}
        atomic_write_text(self.out_dir / MANIFEST, json.dumps(record, indent=1))


def open_prepared(out_dir: str | Path) -> PreparedData:
    """Open the data of an experiment prepared earlier (raises DataError if it was not)."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data at {out_dir} ({MANIFEST} missing): run `nexus data prepare`")
    record = json.loads(path.read_text())
    record["domains"] = {
        name: DomainData(**{**d, "splits": {s: SplitStats(**st) for s, st in d["splits"].items()}})
        for name, d in record["domains"].items()
    }
    return PreparedData(out_dir=out_dir, **record)


def format_report(data: PreparedData) -> str:
    """Per domain and split: documents, tokens, bytes; the embedding cosine-similarity matrix."""
    lines = [f"{'domain':<14}{'split':<12}{'documents':>11}{'tokens':>13}{'bytes':>14}  bytes/token"]
    for dom in data.domains.values():
        for split, st in dom.splits.items():
            ratio = st.bytes / st.tokens if st.tokens else float("nan")
            tag = " (held out)" if dom.held_out and split == "train" else ""
            lines.append(
                f"{dom.name:<14}{split:<12}{st.documents:>11,}{st.tokens:>13,}{st.bytes:>14,}"
                f"  {ratio:.2f}{tag}"
            )
    if data.embedding_dim:
        names, sim = data.similarity()
        width = max(len(n) for n in names) + 2
        lines += [
            "",
            f"domain embeddings: cosine similarity ({data.embedder}, dim {data.embedding_dim})",
            " " * width + "".join(f"{n[:11]:>12}" for n in names),
        ]
        lines += [f"{n:<{width}}" + "".join(f"{v:>12.3f}" for v in row) for n, row in zip(names, sim)]
    return "\n".join(lines)
