"""Domain sources: a registry `SOURCES` of kind -> `Source` (Debian packages, local folders/globs,
Hugging Face datasets, the stdlib; `@register_source` adds a kind, docs/extending.md).

Two steps per source, so that bad input fails before anything is written:
  `source_identity(...)`: cheap, validates that the source exists (package known to apt, folder
      present and non-empty, dataset loadable) and returns what the cache fingerprint needs
      (package versions, file sizes and mtimes, dataset fingerprint);
  `read_source(...)`: yields `(text, origin)` documents, raising DataError on malformed input.

Hugging Face sources are read in batches, never whole: a `save_to_disk` directory memory-mapped,
local data files (parquet/JSONL/JSON/CSV/text; `path` a builder name with `data_files`, or a
directory of such files) and hub datasets streamed (`streaming: false` downloads a hub dataset
into the HF cache first).
"""

from __future__ import annotations

import functools
import glob
import sys
import sysconfig
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

from nexus.data import debian
from nexus.data.config import DomainConfig, SourceConfig, SplitConfig
from nexus.data.formats import Document, list_files, parse_files
from nexus.errors import ConfigError, DataError

# The stdlib's own test suites hold deliberately broken files; third-party code is not stdlib.
STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


class Source:
    """How one kind of source is checked and read. A subclass sets `kind` (the `SourceConfig.kind` that
    selects it), `needs` (SourceConfig fields it requires), `natural_format` (what format "auto"
    means) and `local_path`, implements `identity` and `read`, and is added with `@register_source`."""

    kind: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    natural_format: ClassVar[str] = "auto"
    local_path: ClassVar[bool] = False
    """`path` is a local path (a relative one is relative to the project home in the pipeline config)."""

    def identity(self, src: SourceConfig, domain: str) -> dict[str, Any]:
        """Validate the source (cheaply) and return what the cache fingerprint needs besides the kind,
        format and max_documents."""
        raise NotImplementedError

    def read(self, src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
        """All documents `(text, origin)` of the source (`read_source` keeps the first max_documents)."""
        raise NotImplementedError

    def describe(self, src: SourceConfig) -> str:
        """Where the source reads from, for messages."""
        return str(src.path)

    def check_all(self, sources: list[SourceConfig]) -> None:
        """Validate every source of this kind of an experiment at once, before any is read (optional)."""


SOURCES: dict[str, Source] = {}
"""kind -> Source: every kind a `SourceConfig` may name."""


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make `cls.kind` a source kind (of SourceConfig, Hydra's `data.sources`, presets)."""
    SOURCES[cls.kind] = cls()
    return cls


def get_source(kind: str) -> Source:
    if kind not in SOURCES:
        raise ConfigError(f"source kind {kind!r} is not one of {tuple(SOURCES)}")
    return SOURCES[kind]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _format(src: SourceConfig) -> str:
    return src.format if src.format != "auto" else get_source(src.kind).natural_format


def _files(src: SourceConfig, domain: str, root: str, exclude: frozenset[str] = frozenset()) -> list[Path]:
    return list_files(root, _format(src), domain, exclude)


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    stats = [(f, f.stat()) for f in files]
    return [(str(f), s.st_size, s.st_mtime_ns) for f, s in stats]


def source_identity(src: SourceConfig, domain: str) -> dict[str, Any]:
    """Validate a source and describe it for the cache fingerprint (does not read documents)."""
    ident: dict[str, Any] = {"kind": src.kind, "format": _format(src), "max_documents": src.max_documents}
    return {**ident, **get_source(src.kind).identity(src, domain)}


def read_source(src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
    """Documents of one source, at most `src.max_documents`."""
    return islice(get_source(src.kind).read(src, domain, cache_dir), src.max_documents)


def check_sources(sources: list[SourceConfig]) -> None:
    """Each kind's `check_all` over its sources (e.g. one apt query for every Debian package)."""
    for kind, source in SOURCES.items():
        source.check_all([s for s in sources if s.kind == kind])


def describe(src: SourceConfig) -> str:
    """Where a source reads from, for messages."""
    return get_source(src.kind).describe(src)


@register_source
class DebianSource(Source):
    """`package` downloaded with `apt-get download` into the cache (a metapackage is followed)."""

    kind = "debian"
    needs = ("package",)

    def identity(self, src: SourceConfig, domain: str) -> dict[str, Any]:
        return {"packages": [(p.name, p.version) for p in debian.resolve_package(src.package, domain)]}

    def read(self, src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
        roots = [
            debian.fetch_package(info, cache_dir, domain)
            for info in debian.resolve_package(src.package, domain)
        ]
        files = [f for root in roots for f in _files(src, domain, str(root))]
        yield from parse_files(files, _format(src), domain, src)

    def describe(self, src: SourceConfig) -> str:
        return f"Debian package {src.package}"

    def check_all(self, sources: list[SourceConfig]) -> None:
        debian.query_packages([s.package for s in sources])


@register_source
class FolderSource(Source):
    """`path`: a directory or a glob of .txt/.md/.jsonl files (or a tree in one of the package formats)."""

    kind = "folder"
    needs = ("path",)
    local_path = True

    def identity(self, src: SourceConfig, domain: str) -> dict[str, Any]:
        return {"files": _file_stats(_files(src, domain, src.path)), "text_field": src.text_field}

    def read(self, src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
        return parse_files(_files(src, domain, src.path), _format(src), domain, src)


@register_source
class StdlibSource(Source):
    """The running interpreter's standard library `.py` files (tests excluded)."""

    kind = "stdlib"
    natural_format = "python"

    def identity(self, src: SourceConfig, domain: str) -> dict[str, Any]:
        return {"python": sys.version, "files": _file_stats(self._files(src, domain))}

    def read(self, src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
        return parse_files(self._files(src, domain), _format(src), domain, src)

    def describe(self, src: SourceConfig) -> str:
        return f"stdlib {stdlib_root()}"

    def _files(self, src: SourceConfig, domain: str) -> list[Path]:
        return _files(src, domain, str(stdlib_root()), STDLIB_EXCLUDE)


@register_source
class HFSource(Source):
    """A Hugging Face dataset (streamed), a `save_to_disk` directory, local data files, or a builder name
    with `data_files`; read in batches, never loaded whole."""

    kind = "hf"
    needs = ("path",)

    def identity(self, src: SourceConfig, domain: str) -> dict[str, Any]:
        return {
            "dataset": _hf_identity(src, domain),
            "text_field": src.text_field,
            "filter": [src.filter_field, src.filter_value],
        }

    def read(self, src: SourceConfig, domain: str, cache_dir: Path) -> Iterator[Document]:
        return _read_hf(src, domain)


HF_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
HF_BATCH = 1000


def _hf_saved(path: str) -> bool:
    local = Path(path)
    return local.is_dir() and any((local / m).exists() for m in ("state.json", "dataset_dict.json"))


def _hf_files(src: SourceConfig) -> tuple[str, list[Path]] | None:
    """(builder, files) of an hf source over local data files; None for a hub dataset. `data_files`
    is a file or glob read by builder `path` ("json", "parquet", ...); a local `path` that is not a
    `save_to_disk` directory is a file or a directory of data files, builder by suffix."""
    if src.data_files:
        return src.path, sorted(Path(f) for f in glob.glob(src.data_files, recursive=True))  # type: ignore[return-value]
    local = Path(src.path)  # type: ignore[arg-type]
    if not local.exists():
        return None
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.suffix in HF_BUILDERS)
    builders = {HF_BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataError(
            f"{src.path}: expected data files of one kind ({', '.join(HF_BUILDERS)}), found "
            f"{sorted({f.suffix for f in files}) or 'none'}"
        )
    return builders.pop(), files  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _load_hf_cached(path: str, config: str | None, split: str, data_files: str | None, streaming: bool):
    import datasets

    if _hf_saved(path):
        loaded = datasets.load_from_disk(path)  # memory-mapped
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    local = _hf_files(SourceConfig("hf", path=path, data_files=data_files))
    if local is not None:
        builder, files = local
        if not files:
            raise FileNotFoundError(f"no file matches {data_files or path}")
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split, streaming=True)
    return datasets.load_dataset(path, config, split=split, streaming=streaming)


def _load_hf(src: SourceConfig, domain: str):
    try:
        ds = _load_hf_cached(src.path, src.hf_config, src.hf_split, src.data_files, src.streaming)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFound, ConnectionError, ValueError...)
        where = f"{src.path}" + (f" (data_files={src.data_files})" if src.data_files else "")
        raise DataError(
            f"domain {domain!r}: cannot load dataset {where} split {src.hf_split!r}: "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from err
    _check_columns(src, domain, ds.column_names)
    return ds


def _check_columns(src: SourceConfig, domain: str, columns: list[str] | None) -> None:
    if columns is None:  # a streamed dataset whose features are known only once read
        return
    for key in (src.text_field, src.filter_field):
        if key is not None and key.split(".")[0] not in columns:
            raise DataError(
                f"domain {domain!r}: dataset {src.path} has no column {key!r} (columns: {sorted(columns)})"
            )


def _hf_identity(src: SourceConfig, domain: str) -> Any:
    """A saved dataset's fingerprint, local files' stats, or a hub dataset's name, config and split."""
    ds = _load_hf(src, domain)
    if _hf_saved(src.path):  # type: ignore[arg-type]
        return ds._fingerprint
    local = _hf_files(src)
    if local is not None:
        return {"builder": local[0], "files": _file_stats(local[1])}
    return {"hub": src.path, "config": src.hf_config, "split": src.hf_split}


def _lookup(record: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _read_hf(src: SourceConfig, domain: str) -> Iterator[Document]:
    ds = _load_hf(src, domain)
    i = -1
    for batch in ds.iter(batch_size=HF_BATCH):
        if i < 0:
            _check_columns(src, domain, list(batch))
        for values in zip(*batch.values()):
            i += 1
            record = dict(zip(batch, values))
            if src.filter_field is not None and _lookup(record, src.filter_field) != src.filter_value:
                continue
            text = _lookup(record, src.text_field)
            if not isinstance(text, str):
                raise DataError(
                    f"domain {domain!r}: dataset {src.path} row {i} has no string {src.text_field!r}"
                )
            yield text, f"{src.path}[{i}]"


def check_folder_domain(name: str, folder: str, splits: SplitConfig | None = None) -> int:
    """Read a new domain's folder the way `prepare_experiment` will, writing nothing: the name, the
    files (present, UTF-8, valid JSONL) and documents enough for every split of `splits`. Returns the
    number of documents. Costs one read of the folder; it lets a flow refuse bad input before any work."""
    from nexus.data.documents import split_documents

    (src,) = DomainConfig.folder(name, folder).sources
    parts = split_documents(name, read_source(src, name, Path()), splits or SplitConfig(), folder)
    return sum(len(p.text) for p in parts.values())


__all__ = [
    "SOURCES",
    "STDLIB_EXCLUDE",
    "Source",
    "check_folder_domain",
    "check_sources",
    "describe",
    "get_source",
    "read_source",
    "register_source",
    "source_identity",
    "stdlib_root",
]
