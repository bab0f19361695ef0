"""Which documents land in which split, at the boundaries and end to end.

A document's split is fixed by u = the first 8 bytes of SHA-256(salt:doc id) / 2^64 (part of the data
recipe, `RECIPE_VERSION`): u in [0, validation) -> validation, [validation, validation + test) -> test,
[validation + test, 1) -> train. The tests pin the half-open intervals with documents that sit exactly
on a boundary, then follow real documents from a folder through `prepare_experiment` into the packed
splits and into what training and validation read."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nexus.data import prepare_experiment
from nexus.data.config import (
    DataConfig,
    DomainConfig,
    EmbeddingConfig,
    PackingConfig,
    SplitConfig,
    TokenizerConfig,
)
from nexus.data.documents import SPLITS, assign_split, doc_id, normalise, write_documents
from nexus.training.datamodule import packed_data_module


def position(doc: str, salt: str = "nexus") -> float:
    """u of a document id, in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{doc}".encode()).digest()[:8], "big") / 2**64


def expected_split(doc: str, cfg: SplitConfig) -> str:
    u = position(doc, cfg.salt)
    if u < cfg.validation:
        return "validation"
    return "test" if u < cfg.validation + cfg.test else "train"


IDS = [f"doc-{i}" for i in range(4000)]


def test_every_document_falls_in_the_half_open_interval_of_its_split():
    cfg = SplitConfig(validation=0.1, test=0.15)
    got = [assign_split(d, cfg) for d in IDS]
    assert got == [expected_split(d, cfg) for d in IDS]
    shares = {s: got.count(s) / len(IDS) for s in SPLITS}
    assert shares == pytest.approx({"validation": 0.1, "test": 0.15, "train": 0.75}, abs=0.02)


def _sum_exactly(v: float, target: float) -> float:
    """A test fraction t with `v + t == target` in floating point."""
    t = target - v
    while v + t != target:
        t = math.nextafter(t, math.inf if v + t < target else -math.inf)
    return t


def test_a_document_on_a_boundary_belongs_to_the_split_above_it():
    """u == validation is test, not validation; u == validation + test is train, not test; the
    closest documents below each boundary stay in the split below it."""
    ranked = sorted(IDS, key=position)
    below_v, on_v = ranked[399], ranked[400]
    below_t, on_t = ranked[999], ranked[1000]
    v = position(on_v)
    cfg = SplitConfig(validation=v, test=_sum_exactly(v, position(on_t)))
    assert cfg.validation + cfg.test == position(on_t)
    assert assign_split(on_v, cfg) == "test" and assign_split(below_v, cfg) == "validation"
    assert assign_split(on_t, cfg) == "train" and assign_split(below_t, cfg) == "test"
    got = [assign_split(d, cfg) for d in ranked]
    assert got == ["validation"] * 400 + ["test"] * 600 + ["train"] * (len(IDS) - 1000)


def test_written_documents_are_in_the_split_of_their_id_once(tmp_path):
    """`write_documents` (what `prepare_experiment` streams through): each kept document is in exactly
    the split its id selects; nothing is lost, duplicated or leaked into a second split."""
    from datasets import load_from_disk

    cfg = SplitConfig(validation=0.2, test=0.2, min_chars=5)
    docs = [(f"document number {i} of the corpus", f"src:{i}") for i in range(300)]
    docs += docs[:50]  # exact duplicates are dropped before splitting
    stats = write_documents("d", docs, cfg, "test corpus", tmp_path / "docs")
    written = load_from_disk(str(tmp_path / "docs"))
    ids = {s: list(written[s]["doc_id"]) for s in SPLITS}
    for split in SPLITS:
        assert all(expected_split(i, cfg) == split for i in ids[split]), split
        assert stats[split]["documents"] == len(ids[split])
        assert [doc_id(t) for t in written[split]["text"]] == ids[split]
    every = [i for s in SPLITS for i in ids[s]]
    assert len(every) == len(set(every)) == 300
    assert set(every) == {doc_id(normalise(text)) for text, _ in docs}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two small folder domains prepared for real (tokenizer, packing; no embeddings)."""
    root = tmp_path_factory.mktemp("splits")
    domains = []
    for name, word in (("alpha", "apple"), ("beta", "banana")):
        folder = root / name
        folder.mkdir()
        lines = [json.dumps({"text": f"{word} document {i}: {word} text number {i * 7}."}) for i in range(80)]
        (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
        domains.append(DomainConfig.folder(name, str(folder)))
    cfg = DataConfig(
        experiment="splits",
        domains=tuple(domains),
        out_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        splits=SplitConfig(validation=0.2, test=0.2),
        tokenizer=TokenizerConfig(vocab_size=300, sample_chars_per_domain=5_000),
        packing=PackingConfig(seq_len=8, num_proc=1, batch_size=64),
        embedding=EmbeddingConfig(enabled=False),
    )
    return cfg, prepare_experiment(cfg, progress=False)


def test_prepared_documents_and_packed_splits_follow_the_assignment(prepared):
    """Each domain's documents in each split are those the rule assigns there, and each packed split
    is exactly the token stream of its own documents (not a neighbouring split's)."""
    cfg, data = prepared
    tok = data.load_tokenizer()
    for name in ("alpha", "beta"):
        docs = data.documents(name)
        for split in SPLITS:
            assert docs[split].num_rows > 0
            assert all(expected_split(i, cfg.splits) == split for i in docs[split]["doc_id"]), (name, split)
            stream = np.asarray(data.packed(name, split).tokens).tolist()
            assert tok.decode(stream) == "".join(t + "<|endoftext|>" for t in docs[split]["text"]), (
                name,
                split,
            )
        assert sum(docs[s].num_rows for s in SPLITS) == 80


def test_training_reads_train_and_validation_reads_validation(prepared):
    """The data module of every training stage: train batches from the train split, validation from
    the validation split; the test split (held-out evaluation) is read by neither."""
    _, data = prepared
    dm = packed_data_module(str(data.out_dir), {"alpha": 1.0, "beta": 1.0}, batch_size=2, max_steps=1)
    for name in ("alpha", "beta"):
        train, val = dm.train_sets[name].dataset, dm.val_sets[name].dataset
        assert (train.split, val.split) == ("train", "validation")
        assert Path(train.path) == Path(data.out_dir) / "packed" / name / "train"
        assert np.array_equal(np.asarray(val.tokens), np.asarray(data.packed(name, "validation").tokens))
        assert not np.array_equal(np.asarray(val.tokens), np.asarray(data.packed(name, "test").tokens))
