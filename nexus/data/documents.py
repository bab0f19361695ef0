"""Documents of a domain: light normalisation, exact dedup, hash-assigned splits, fingerprint.

A document's split depends only on its own normalised text (and the split salt), never on the
other documents: splits are disjoint (exact duplicates are dropped first, so equal texts cannot
land in two splits) and stable when documents are added to a domain.

`write_documents` streams a domain into per-split Arrow shards on disk (`SHARD_DOCUMENTS`
documents each) and keeps only 8 bytes per document in memory (its dedup hash), so a domain of any
size is split in bounded memory; `split_documents` is the same in memory, for small inputs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nexus.data.cache import fingerprint
from nexus.data.config import SplitConfig
from nexus.errors import DataError

RECIPE_VERSION = 1  # bump when normalisation or splitting changes: it invalidates every cache
SPLITS = ("train", "validation", "test")
_OVERSTRIKE = re.compile(r"[^\n]\x08")  # old terminal bold/underline: "_\bA" -> "A"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", flags=re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC, '\\n' line ends, no control characters or trailing spaces, at most one blank line in a
    row, no leading/trailing blank lines. Indentation is kept (code and reStructuredText need it)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text))
    return _BLANK_RUNS.sub("\n\n", _TRAILING_SPACE.sub("", text)).strip("\n")


def doc_id(text: str) -> str:
    """Content hash of a normalised document (32 hex characters)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def assign_split(doc: str, cfg: SplitConfig) -> str:
    """'train' | 'validation' | 'test' from a salted hash of the document id."""
    digest = hashlib.sha256(f"{cfg.salt}:{doc}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.validation:
        return "validation"
    return "test" if u < cfg.validation + cfg.test else "train"


def hash_order(ids: Iterable[str], seed: int | str = 0) -> list[int]:
    """Indices of `ids` ranked by a seeded hash: a uniform, order-independent shuffle, so "the
    first k" is a reproducible random sample that keeps its members when documents are added.
    Holds 16 bytes per id (a 64-bit key and the argsort), not the ids: pass a lazy iterable (e.g.
    `column_batches`) for a large split."""
    keys = np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids),
        dtype=np.uint64,
    )
    return np.argsort(keys, kind="stable").tolist()


def column_batches(dataset, column: str, batch_size: int = 10_000) -> Iterator[str]:
    """The values of one column of a (memory-mapped) `datasets.Dataset`, read in batches."""
    for start in range(0, len(dataset), batch_size):
        yield from dataset[start : start + batch_size][column]


class SeenHashes:
    """Exact-duplicate filter in ~8 bytes per document: 64-bit content hashes (of the already
    SHA-256-derived doc id), recent ones in a set, merged into a sorted array when the set grows."""

    def __init__(self) -> None:
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def add(self, doc: str) -> bool:
        """Record `doc` (a doc id); False if it was seen before."""
        key = int(doc[:16], 16)
        i = np.searchsorted(self.sorted, key)
        if key in self.recent or (i < len(self.sorted) and self.sorted[i] == key):
            return False
        self.recent.add(key)
        if len(self.recent) >= max(65_536, len(self.sorted) // 8):
            self.sorted = np.union1d(
                self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            )
            self.recent.clear()
        return True

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)


@dataclass
class SplitDocuments:
    """Columns of one split: `text`, `doc_id`, `origin` (file/line/headword the text came from)."""

    text: list[str] = field(default_factory=list)
    doc_id: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.text)


def assign_documents(
    docs: Iterable[tuple[str, str]], cfg: SplitConfig, seen: SeenHashes | None = None
) -> Iterator[tuple[str, str, str, str]]:
    """`(split, text, doc_id, origin)` per kept document: normalised, long enough, not a duplicate."""
    seen = SeenHashes() if seen is None else seen
    for raw, origin in docs:
        text = normalise(raw)
        if len(text) < cfg.min_chars:
            continue
        key = doc_id(text)
        if seen.add(key):
            yield assign_split(key, cfg), text, key, origin


def _check_counts(domain: str, counts: dict[str, int], cfg: SplitConfig, where: str) -> None:
    total = sum(counts.values())
    if not total:
        raise DataError(f"domain {domain!r}: no document of >= {cfg.min_chars} characters in {where}")
    for name, n in counts.items():
        if not n:
            raise DataError(
                f"domain {domain!r}: split {name!r} is empty ({total} documents in "
                f"{where}); add documents or raise the split fraction"
            )


def split_documents(
    domain: str, docs: Iterable[tuple[str, str]], cfg: SplitConfig, where: str
) -> dict[str, SplitDocuments]:
    """Normalise, drop short and duplicate documents, assign splits, in memory. `where` names the
    sources in errors. Raises DataError when the domain or one of its splits ends up empty."""
    splits = {name: SplitDocuments() for name in SPLITS}
    for split, text, key, origin in assign_documents(docs, cfg):
        part = splits[split]
        part.text.append(text)
        part.doc_id.append(key)
        part.origin.append(origin)
    _check_counts(domain, {name: len(part.text) for name, part in splits.items()}, cfg, where)
    return splits


SHARD_DOCUMENTS, SHARD_BYTES = 10_000, 16 << 20
"""A split's buffer is written as a shard at this many documents or UTF-8 bytes, whichever first."""
COLUMNS = ("text", "doc_id", "origin")


def write_documents(
    domain: str, docs: Iterable[tuple[str, str]], cfg: SplitConfig, where: str, out_dir: Path
) -> dict[str, dict[str, int]]:
    """`split_documents`, streamed: documents go to per-split Arrow shards under `out_dir/shards`
    as they are read, then into `out_dir` as a `datasets.DatasetDict` (`save_to_disk`, read back
    memory-mapped); returns {split: {"documents", "bytes"}}. Memory: one shard's buffer per split
    (`SHARD_DOCUMENTS` / `SHARD_BYTES`) plus 8 bytes per document."""
    import pyarrow as pa
    from datasets import Dataset as HFDataset
    from datasets import DatasetDict, concatenate_datasets

    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    shards: dict[str, list[Path]] = {name: [] for name in SPLITS}
    buffers = {name: SplitDocuments() for name in SPLITS}
    buffered = dict.fromkeys(SPLITS, 0)
    stats = {name: {"documents": 0, "bytes": 0} for name in SPLITS}
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)

    def flush(split: str) -> None:
        part = buffers[split]
        if not part.text:
            return
        path = out_dir / "shards" / f"{split}-{len(shards[split]):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch([part.text, part.doc_id, part.origin], schema=schema))
        shards[split].append(path)
        buffers[split], buffered[split] = SplitDocuments(), 0

    for split, text, key, origin in assign_documents(docs, cfg):
        part = buffers[split]
        part.text.append(text)
        part.doc_id.append(key)
        part.origin.append(origin)
        size = len(text.encode("utf-8"))
        stats[split]["documents"] += 1
        stats[split]["bytes"] += size
        buffered[split] += size
        if len(part.text) >= SHARD_DOCUMENTS or buffered[split] >= SHARD_BYTES:
            flush(split)
    for split in SPLITS:
        flush(split)
    _check_counts(domain, {name: st["documents"] for name, st in stats.items()}, cfg, where)
    DatasetDict(
        {name: concatenate_datasets([HFDataset.from_file(str(p)) for p in shards[name]]) for name in SPLITS}
    ).save_to_disk(str(out_dir))
    shutil.rmtree(out_dir / "shards")
    return stats


def documents_fingerprint(domain: str, source_identities: list[dict], cfg: SplitConfig) -> str:
    """Fingerprint of a domain's documents: its sources (and their versions) plus the recipe."""
    recipe = {"version": RECIPE_VERSION, "splits": [cfg.validation, cfg.test, cfg.salt, cfg.min_chars]}
    return fingerprint({"domain": domain, "sources": source_identities, "recipe": recipe})


def to_dataset_dict(splits: dict[str, SplitDocuments]):
    """A `datasets.DatasetDict` with one Dataset per split."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_dict(vars(part)) for name, part in splits.items()})
