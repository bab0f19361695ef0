"""Typed configuration of the data pipeline, validated in `__post_init__`.

A `DataConfig` names the experiment's domains (each a union of one or more `SourceConfig`s), how
documents are split, the tokenizer, the packing, the stage mixtures and the domain embeddings.
Presets (the `demo` experiment and the `tiny` fixture experiment) live in `nexus.data.presets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nexus.errors import ConfigError, DataError

# How the files of a debian/folder/stdlib source are turned into documents (see nexus.data.formats).
FORMATS = ("auto", "text", "jsonl", "dictd", "rst", "jargon", "fortunes", "python")
WEIGHTINGS = ("proportional", "uniform", "explicit")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_LENGTH = 64


def check_domain_name(name: str) -> str:
    """A domain name is one safe path component (it names folders, registered models and experts):
    a letter or digit first, then letters, digits, `_`, `.` or `-`, at most 64 characters."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"domain name {name!r} must match {_NAME.pattern} and have at most "
            f"{MAX_NAME_LENGTH} characters (no slash, space or leading dot)"
        )
    return name


@dataclass(frozen=True)
class SourceConfig:
    """One source of documents.

    kind: a kind of the registry `nexus.data.sources.SOURCES`:
      - "debian": `package` is downloaded with `apt-get download` and extracted into the cache
        (a metapackage such as `linux-doc` is followed to the package it depends on);
      - "folder": `path` is a directory or a glob of `.txt`/`.md`/`.jsonl` files (or a tree in one
        of the package formats);
      - "hf": `path` is a Hugging Face dataset name (streamed), a local `save_to_disk` directory, a
        local file or directory of parquet/JSONL/JSON/CSV/text files, or a builder name such as
        "json" together with `data_files` (a glob); read in batches, never loaded whole;
      - "stdlib": the running interpreter's standard library `.py` files (tests excluded).
    format: how files become documents; "auto" picks by file suffix (.txt/.md: one document per
      file, .jsonl: one per line) for folders, and the natural format for the other kinds.
    """

    kind: str
    package: str | None = None
    path: str | None = None
    format: str = "auto"
    text_field: str = "text"  # jsonl / hf: the column holding the text
    hf_config: str | None = None
    hf_split: str = "train"
    data_files: str | None = None  # hf builder (e.g. "json"): file or glob
    filter_field: str | None = None  # hf: dotted key, e.g. "meta.redpajama_set_name"
    filter_value: str | None = None
    streaming: bool = True  # hf hub datasets: stream (False: download into the HF cache first)
    max_documents: int | None = None  # keep at most this many documents (first ones read)
    # Skip (instead of failing on) a document or file that is not UTF-8: for curated corpora with a
    # handful of legacy bytes (GCIDE has 3 cp1252 entries in 200k); user folders stay strict.
    skip_undecodable: bool = False

    def __post_init__(self) -> None:
        from nexus.data.sources import get_source  # the registry's module imports this one

        source = get_source(self.kind)
        if self.format not in FORMATS:
            raise ConfigError(f"source format {self.format!r} is not one of {FORMATS}")
        for key in source.needs:
            if not getattr(self, key):
                raise ConfigError(f"a {self.kind} source needs `{key}`")
        if (self.filter_field is None) != (self.filter_value is None):
            raise ConfigError("`filter_field` and `filter_value` go together")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be >= 1, got {self.max_documents}")


@dataclass(frozen=True)
class DomainConfig:
    """A named domain; `held_out` domains (the extension domain) are kept out of the tokenizer's
    training sample and out of the initial mixtures."""

    name: str
    sources: tuple[SourceConfig, ...]
    held_out: bool = False

    def __post_init__(self) -> None:
        check_domain_name(self.name)
        if not self.sources:
            raise ConfigError(f"domain {self.name!r} has no sources")
        object.__setattr__(self, "sources", tuple(self.sources))

    @classmethod
    def debian(
        cls, name: str, packages: dict[str, str], held_out: bool = False, **options: Any
    ) -> DomainConfig:
        """A domain from Debian packages `{package: format}`; `options` go to each SourceConfig."""
        sources = tuple(SourceConfig("debian", package=p, format=f, **options) for p, f in packages.items())
        return cls(name, sources, held_out)

    @classmethod
    def folder(
        cls, name: str, path: str, format: str = "auto", text_field: str = "text", held_out: bool = False
    ) -> DomainConfig:
        """A domain from a local folder or glob (how a user brings a new domain)."""
        return cls(
            name, (SourceConfig("folder", path=str(path), format=format, text_field=text_field),), held_out
        )


@dataclass(frozen=True)
class SplitConfig:
    """Documents go to train/validation/test by a hash of their normalised text (salted), so the
    assignment of a document never changes when others are added."""

    validation: float = 0.05
    test: float = 0.05
    salt: str = "nexus"
    min_chars: int = 16  # shorter documents are dropped

    def __post_init__(self) -> None:
        if not (0 < self.validation < 1 and 0 < self.test < 1 and self.validation + self.test < 1):
            raise ConfigError(
                f"split fractions validation={self.validation}, test={self.test} "
                "must be in (0, 1) and sum to < 1"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    """Train a byte-level BPE on a sample of the initial domains, or use `path` (a tokenizer.json
    file or a local Hugging Face tokenizer directory) as is."""

    vocab_size: int = 8192
    sample_chars_per_domain: int = 2_000_000
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and not 260 <= self.vocab_size <= 2**32 - 1:
            raise ConfigError(f"tokenizer vocab_size {self.vocab_size} must be >= 260 (256 bytes + specials)")
        if self.sample_chars_per_domain < 1:
            raise ConfigError("tokenizer sample_chars_per_domain must be >= 1")


@dataclass(frozen=True)
class PackingConfig:
    """Fixed-length packing: `seq_len` tokens per training sequence (each item holds seq_len + 1
    tokens so inputs and shifted targets come from one slice)."""

    seq_len: int = 256
    num_proc: int = 1
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.num_proc < 1 or self.batch_size < 1:
            raise ConfigError(f"packing seq_len/num_proc/batch_size must be >= 1: {self}")


@dataclass(frozen=True)
class MixtureConfig:
    """Domain weights of the training stages (see nexus.data.mixture).

    weighting: "proportional" (to token counts, the paper's default), "uniform", or "explicit"
      (`weights`). general_share: share of the general/seed mix (proportional over the initial
      domains) blended into the MoE stage. extension_new_share: share of the new domain in the
      extension finetune (the rest: the previous domains' mix).
    """

    weighting: str = "proportional"
    weights: dict[str, float] | None = None
    general_share: float = 0.0
    extension_new_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"mixture weighting {self.weighting!r} is not proportional|uniform|explicit")
        if (self.weighting == "explicit") != (self.weights is not None):
            raise ConfigError("mixture `weights` is required for, and only for, weighting='explicit'")
        if any(w < 0 for w in (self.weights or {}).values()) or (
            self.weights is not None and sum(self.weights.values()) <= 0
        ):
            raise ConfigError(f"mixture weights must be >= 0 with a positive sum: {self.weights}")
        for key in ("general_share", "extension_new_share"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"mixture {key} must be in [0, 1], got {getattr(self, key)}")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Domain embeddings d_i: mean sentence embedding over `sample_size` training documents, each cut
    into at most `max_chunks_per_doc` chunks of <= `max_chars` characters (roughly the embedder's
    max length: all-MiniLM-L6-v2 reads 256 word pieces ~ 1000 characters).
    model: "default" (the packaged all-MiniLM-L6-v2) or any sentence-transformers name or path.
    expected_dim: if set, the embedder must produce vectors of this size (the router's input)."""

    model: str = "default"
    sample_size: int = 64
    batch_size: int = 32
    max_chars: int = 1000
    max_chunks_per_doc: int = 1
    expected_dim: int | None = None
    seed: int = 0
    enabled: bool = True

    def __post_init__(self) -> None:
        if min(self.sample_size, self.batch_size, self.max_chars, self.max_chunks_per_doc) < 1:
            raise ConfigError(f"embedding sizes must be >= 1: {self}")


@dataclass(frozen=True)
class DataConfig:
    """Everything `prepare_experiment` builds. `out_dir` holds the experiment's products;
    `cache_dir` holds downloads shared between experiments."""

    experiment: str
    domains: tuple[DomainConfig, ...]
    out_dir: str = "outputs/data/{experiment}"
    cache_dir: str = ".cache/nexus"
    splits: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        names = [d.name for d in self.domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"experiment {self.experiment!r}: domain names used twice: {dupes}")
        if not self.initial_domains:
            raise ConfigError(f"experiment {self.experiment!r} has no initial (non-held-out) domain")
        unknown = set(self.mixture.weights or {}) - set(names)
        if unknown:
            raise ConfigError(f"mixture weights name unknown domains {sorted(unknown)}; known: {names}")

    @property
    def initial_domains(self) -> list[str]:
        return [d.name for d in self.domains if not d.held_out]

    @property
    def held_out_domains(self) -> list[str]:
        return [d.name for d in self.domains if d.held_out]

    def resolved_out_dir(self) -> str:
        return self.out_dir.format(experiment=self.experiment)
