"""Normalisation, dedup, hash splits (disjoint, stable when documents are added), fingerprints."""

import pytest

from nexus.data.config import SplitConfig
from nexus.data.documents import SPLITS, assign_split, documents_fingerprint, normalise, split_documents
from nexus.errors import DataError

CFG = SplitConfig(validation=0.1, test=0.1, min_chars=5)


def corpus(n, prefix="doc"):
    return [(f"{prefix} number {i} with some words", f"src:{i}") for i in range(n)]


def test_normalise_is_light():
    raw = "Cafe\u0301  \r\nline\x07 two\t \n\n\n\n_\x08Bold\n"
    assert normalise(raw) == "Café\nline two\n\nBold"
    assert normalise("    indented code\n") == "    indented code"  # indentation is content


def test_exact_duplicates_are_dropped_and_short_docs_filtered():
    docs = corpus(200) + corpus(200) + [("tiny", "x"), ("doc number 3 with some words  ", "dup-after-norm")]
    splits = split_documents("d", docs, CFG, "test")
    ids = [i for s in SPLITS for i in splits[s].doc_id]
    assert len(ids) == len(set(ids)) == 200


def test_splits_are_disjoint_and_stable_when_documents_are_added():
    before = split_documents("d", corpus(300), CFG, "test")
    after = split_documents("d", corpus(300) + corpus(300, prefix="new"), CFG, "test")
    sets_before = {s: set(before[s].text) for s in SPLITS}
    sets_after = {s: set(after[s].text) for s in SPLITS}
    for a in SPLITS:
        assert sets_before[a] <= sets_after[a]  # no old document moved split
        for b in SPLITS:
            if a < b:
                assert not sets_after[a] & sets_after[b]
    shares = {s: len(after[s].text) / 600 for s in SPLITS}
    assert shares["validation"] == pytest.approx(0.1, abs=0.04) and shares["train"] > 0.7
    other_salt = SplitConfig(0.1, 0.1, salt="other")
    assert any(assign_split(str(i), CFG) != assign_split(str(i), other_salt) for i in range(100))


def test_empty_domain_or_split_is_an_error_naming_the_domain():
    with pytest.raises(DataError, match="'d': no document"):
        split_documents("d", [("x", "o")], CFG, "folder /data/d")
    with pytest.raises(DataError, match="'d': split .* is empty .*folder /data/d"):
        split_documents("d", corpus(3), CFG, "folder /data/d")


def test_fingerprint_tracks_sources_and_recipe():
    ident = [{"kind": "debian", "packages": [["dict-gcide", "0.48.5"]]}]
    fp = documents_fingerprint("d", ident, CFG)
    assert fp == documents_fingerprint("d", ident, CFG)
    assert fp != documents_fingerprint("d", [{"kind": "debian", "packages": [["dict-gcide", "0.49"]]}], CFG)
    assert fp != documents_fingerprint("d", ident, SplitConfig(0.2, 0.1))
