"""Crash-safe file writes: a file or directory is replaced in one rename, so a reader (or a crash)
sees the old complete version or the new complete version, never a partial one. Temporary names
carry the writer's pid, so the next write to the same path can tell a dead writer's leftovers from
a live concurrent one's and clean them up (`recover`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def _writer_alive(name: str) -> bool:
    """Whether the process that named a `.<name>.tmp-<pid>-…` / `.<name>.old-<pid>-…` sibling still runs."""
    try:
        pid = int(name.rsplit(".tmp-", 1)[-1].rsplit(".old-", 1)[-1].split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def recover(path: Path) -> None:
    """Undo what a writer killed mid-write left next to `path`: its temporary copy is removed, and if
    it died between the two renames of `replace_dir` (path moved aside, new one not yet in place),
    the previous version is moved back."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if not _writer_alive(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(
                missing_ok=True
            )
    stale = [p for p in path.parent.glob(f".{path.name}.old-*") if not _writer_alive(p.name)]
    if not path.exists() and len(stale) == 1:
        os.replace(stale[0], path)
    else:
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst` (moved aside first, removed after)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling directory of `path` (named so that `recover(path)` removes it if its
    writer dies), removed when the block ends: to fill several directories and move them into
    `path` only when all are complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it is fsynced and replaces `path` in
    one rename, on any error it is removed and `path` is left as it was."""
    with staging_directory(path) as tmp:
        yield tmp
        _fsync_tree(tmp)
        replace_dir(tmp, Path(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the temporary file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
