"""Fingerprints and atomic, fingerprint-keyed cache entries.

A cache entry is a directory holding a `_fingerprint` file. It is built in a sibling temporary
directory and moved into place with a rename, so a crash never leaves a half-written entry that
a later run would mistake for a valid one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nexus.io import atomic_directory

FINGERPRINT_FILE = "_fingerprint"


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def read_fingerprint(path: Path) -> str | None:
    marker = Path(path) / FINGERPRINT_FILE
    return marker.read_text().strip() if marker.is_file() else None


def cached_dir(path: Path, fp: str, build: Callable[[Path], None]) -> bool:
    """Make `path` a directory built by `build(tmp_dir)` for fingerprint `fp`.

    Returns True when a valid entry was already there (a cache hit) and nothing was built.
    """
    path = Path(path)
    if read_fingerprint(path) == fp:
        return True
    with atomic_directory(path) as tmp:
        build(tmp)
        (tmp / FINGERPRINT_FILE).write_text(fp + "\n")
    return False
