"""Fingerprints and atomic cache entries."""

import pytest

from nexus.data.cache import cached_dir, fingerprint, read_fingerprint
from nexus.io import atomic_write_text


def test_fingerprint_ignores_key_order_but_not_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_cached_dir_builds_once_and_rebuilds_on_new_fingerprint(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "x.txt").write_text(str(len(calls)))

    target = tmp_path / "entry"
    assert cached_dir(target, "fp1", build) is False
    assert cached_dir(target, "fp1", build) is True
    assert cached_dir(target, "fp2", build) is False
    assert len(calls) == 2 and (target / "x.txt").read_text() == "2"
    assert read_fingerprint(target) == "fp2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temp or old dirs left


def test_failed_build_leaves_previous_entry_and_no_temp(tmp_path):
    target = tmp_path / "entry"
    cached_dir(target, "fp1", lambda tmp: (tmp / "ok").write_text("1"))

    def broken(tmp):
        (tmp / "half").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_dir(target, "fp2", broken)
    assert read_fingerprint(target) == "fp1" and not (target / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    atomic_write_text(tmp_path / "f.txt", "hello")
    assert (tmp_path / "f.txt").read_text() == "hello"
