"""Documents of a domain: light normalisation, exact dedup, hash-assigned splits, fingerprint.

A document's split depends only on its own normalised text (and the split salt), never on the
other documents: splits are disjoint (exact duplicates are dropped first, so equal texts cannot
land in two splits) and stable when documents are added to a domain.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def hash_order(ids: Sequence[str], seed: int | str = 0) -> list[int]:
    """Indices of `ids` ranked by a seeded hash: a uniform, order-independent shuffle, so "the
    first k" is a reproducible random sample that keeps its members when documents are added."""
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())


@dataclass
class SplitDocuments:
    """Columns of one split: `text`, `doc_id`, `origin` (file/line/headword the text came from)."""

    text: list[str] = field(default_factory=list)
    doc_id: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.text)


def split_documents(domain: str, docs: Iterable[tuple[str, str]], cfg: SplitConfig,
                    where: str) -> dict[str, SplitDocuments]:
    """Normalise, drop short and duplicate documents, assign splits. `where` names the sources in
    errors. Raises DataError when the domain or one of its splits ends up empty."""
    splits = {name: SplitDocuments() for name in SPLITS}
    seen: set[str] = set()
    for raw, origin in docs:
        text = normalise(raw)
        if len(text) < cfg.min_chars:
            continue
        key = doc_id(text)
        if key in seen:
            continue
        seen.add(key)
        part = splits[assign_split(key, cfg)]
        part.text.append(text)
        part.doc_id.append(key)
        part.origin.append(origin)
    if not seen:
        raise DataError(f"domain {domain!r}: no document of >= {cfg.min_chars} characters in {where}")
    for name, part in splits.items():
        if not part.text:
            raise DataError(f"domain {domain!r}: split {name!r} is empty ({len(seen)} documents in "
                            f"{where}); add documents or raise the split fraction")
    return splits


def documents_fingerprint(domain: str, source_identities: list[dict], cfg: SplitConfig) -> str:
    """Fingerprint of a domain's documents: its sources (and their versions) plus the recipe."""
    recipe = {"version": RECIPE_VERSION, "splits": [cfg.validation, cfg.test, cfg.salt, cfg.min_chars]}
    return fingerprint({"domain": domain, "sources": source_identities, "recipe": recipe})


def to_dataset_dict(splits: dict[str, SplitDocuments]):
    """A `datasets.DatasetDict` with one Dataset per split."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_dict(vars(part)) for name, part in splits.items()})
