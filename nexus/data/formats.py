"""File formats: how the files under a root (a directory, a glob or one file) become documents.

Each format is a pair (file patterns, parser). A parser yields `(text, origin)` per document,
where `origin` names the file (and line or headword) the text came from. Every decoding or
schema problem raises `DataError` naming the domain and the file.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import re
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path

from nexus.data.config import SourceConfig
from nexus.errors import DataError

Document = tuple[str, str]  # (text, origin)
Parser = Callable[[Path, str, SourceConfig], Iterator[Document]]  # (file, domain, source)
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_JARGON_ENTRY = re.compile(r"^   :[^\n]+?:", flags=re.MULTILINE)


def decode(data: bytes, domain: str, where: str, src: SourceConfig) -> str | None:
    """UTF-8 text, or None when `src.skip_undecodable` allows skipping it; else DataError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if src.skip_undecodable:
            return None
        raise DataError(
            f"domain {domain!r}: {where} is not UTF-8 text (byte {err.start}: "
            f"{data[err.start : err.start + 4]!r})"
        ) from err


def read_text(path: Path, domain: str, src: SourceConfig) -> str | None:
    """Text of a file (gzip/dictzip transparently decompressed); see `decode`."""
    data = Path(path).read_bytes()
    return decode(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data, domain, str(path), src)


def _whole(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    text = read_text(path, domain, src)
    if text is not None:
        yield text, str(path)


def _jsonl(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    text_field = src.text_field
    for lineno, line in enumerate((read_text(path, domain, src) or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"domain {domain!r}: {path}:{lineno} is not valid JSON ({err.msg})") from err
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"domain {domain!r}: {path}:{lineno} has no string field {text_field!r}")
        yield text, f"{path}:{lineno}"


def _auto(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    return (_jsonl if path.suffix == ".jsonl" else _whole)(path, domain, src)


def _b64(value: str) -> int:
    out = 0
    for char in value:
        out = out * 64 + _B64[char]
    return out


def _dictd(index: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    """dictd database: `NAME.index` lines `headword<TAB>offset<TAB>length` (base64) into
    `NAME.dict.dz` (dictzip, gzip-compatible); one document per distinct entry."""
    data_file = next(
        (p for p in (index.with_suffix(".dict.dz"), index.with_suffix(".dict")) if p.exists()), None
    )
    if data_file is None:
        raise DataError(f"domain {domain!r}: dictd index {index} has no .dict.dz/.dict beside it")
    raw = Path(data_file).read_bytes()
    body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    seen: set[tuple[int, int]] = set()
    for lineno, line in enumerate((read_text(index, domain, src) or "").splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        try:
            span = (_b64(parts[1]), _b64(parts[2]))
        except KeyError as err:
            raise DataError(f"domain {domain!r}: {index}:{lineno} has a malformed offset") from err
        if span in seen:
            continue
        seen.add(span)
        where = f"{data_file}#{parts[0]}"
        text = decode(body[span[0] : span[0] + span[1]], domain, where, src)
        if text is not None:
            yield text, where


def _jargon(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    """The Jargon File as text: one document per `:headword:` entry (plus the front matter)."""
    text = read_text(path, domain, src) or ""
    starts = [m.start() for m in _JARGON_ENTRY.finditer(text)]
    for start, end in zip([0, *starts], [*starts, len(text)]):
        if end > start:
            yield text[start:end], f"{path}@{start}"


def _fortunes(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    """A fortune file: quotes separated by lines holding a single `%`."""
    for i, quote in enumerate(re.split(r"^%$", read_text(path, domain, src) or "", flags=re.MULTILINE)):
        yield quote, f"{path}#{i}"


def _python(path: Path, domain: str, src: SourceConfig) -> Iterator[Document]:
    """A Python source file, decoded by its coding cookie (PEP 263) as the interpreter does."""
    try:
        with tokenize.open(path) as handle:
            yield handle.read(), str(path)
    except (SyntaxError, UnicodeDecodeError) as err:
        raise DataError(f"domain {domain!r}: cannot decode Python source {path}: {err}") from err


FORMATS: dict[str, tuple[tuple[str, ...], Parser]] = {
    "auto": (("*.txt", "*.md", "*.jsonl"), _auto),
    "text": (("*.txt", "*.md"), _whole),
    "jsonl": (("*.jsonl",), _jsonl),
    "dictd": (("*.index",), _dictd),
    "rst": (("*.rst.txt", "*.rst"), _whole),
    "jargon": (("jargon.txt.gz", "jargon.txt"), _jargon),
    "fortunes": (("fortunes/*", "fortunes/*/*"), _fortunes),  # fortunes/<language>/* (e.g. fortunes-de)
    "python": (("*.py",), _python),
}


def list_files(root: str, fmt: str, domain: str, exclude_parts: frozenset[str] = frozenset()) -> list[Path]:
    """Files of format `fmt` under `root` (a directory, a glob or a file), sorted."""
    patterns = FORMATS[fmt][0]
    if any(c in root for c in "*?["):
        names = [pat.rsplit("/", 1)[-1] for pat in patterns]
        files = [
            Path(p)
            for p in glob.glob(root, recursive=True)
            if any(fnmatch.fnmatch(Path(p).name, n) for n in names)
        ]
        base = None
    else:
        base = Path(root)
        if not base.exists():
            raise DataError(f"domain {domain!r}: {root} does not exist")
        files = [base] if base.is_file() else [p for pat in patterns for p in base.rglob(pat)]
    keep = []
    for path in files:
        rel = path.relative_to(base).parts[:-1] if base is not None and base != path else ()
        if path.is_symlink() or not path.is_file() or ({"__pycache__"} | exclude_parts) & set(rel):
            continue
        if fmt == "fortunes" and (path.suffix or "doc" in rel):
            continue  # .dat indexes; usr/share/doc/fortunes/copyright
        keep.append(path)
    if not keep:
        raise DataError(f"domain {domain!r}: no {fmt} files ({', '.join(patterns)}) under {root}")
    return sorted(set(keep))


def parse_files(files: list[Path], fmt: str, domain: str, src: SourceConfig) -> Iterator[Document]:
    parser = FORMATS[fmt][1]
    for path in files:
        yield from parser(path, domain, src)
