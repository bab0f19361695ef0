"""Packing loses no token; PackedSplit serves fixed-length causal-LM sequences."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from nexus.data.config import SourceConfig
from nexus.data.formats import list_files, parse_files
from nexus.data.packing import PackedSplit, pack_documents, token_dtype
from nexus.data.tokenizer import load_tokenizer, train_tokenizer
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    src = SourceConfig("folder", path=str(CORPORA / "code"), format="python")
    texts = [t for t, _ in parse_files(list_files(src.path, "python", "code"), "python", "code", src)]
    texts.append("a document quoting <|endoftext|> literally")
    tok_file = train_tokenizer(texts, 400, root / "tokenizer.json")
    counts = pack_documents(
        Dataset.from_dict({"text": texts}),
        tok_file,
        root / "split",
        domain="code",
        split="train",
        fingerprint="f" * 64,
        eos_id=0,
        vocab_size=400,
        num_proc=2,
        batch_size=4,
    )
    return texts, load_tokenizer(tok_file), root / "split", counts


def test_decoded_stream_equals_eos_joined_documents(packed):
    texts, tok, path, counts = packed
    split = PackedSplit(path, seq_len=64)
    assert split.tokens.dtype == np.uint16 and counts["tokens"] == split.num_tokens
    assert tok.decode(np.asarray(split.tokens).tolist()) == "".join(t + "<|endoftext|>" for t in texts)
    assert int((np.asarray(split.tokens) == 0).sum()) == len(texts) == split.num_documents
    offsets = split.doc_offsets
    assert tok.decode(split.tokens[offsets[1] : offsets[2] - 1].tolist()) == texts[1]
    assert not list(path.glob("*.arrow"))  # the tokenization cache was cleaned up


def test_items_are_overlapping_windows_covering_every_target(packed):
    _, _, path, _ = packed
    split = PackedSplit(path, seq_len=64)
    assert len(split) == (split.num_tokens - 1) // 64 > 10
    first, second = split[0], split[1]
    assert first.shape == (65,) and first.dtype == np.int64 and first[-1] == second[0]
    targets = np.concatenate([split[i][1:] for i in range(len(split))])
    assert np.array_equal(targets, np.asarray(split.tokens[1 : len(split) * 64 + 1], dtype=np.int64))
    assert np.array_equal(split[-1], split[len(split) - 1])
    with pytest.raises(IndexError):
        split[len(split)]


def test_packed_split_pickles_without_the_memory_map(packed):
    split = PackedSplit(packed[2], seq_len=16)
    split[0]
    clone = pickle.loads(pickle.dumps(split))
    assert clone._tokens is None and np.array_equal(clone[3], split[3])


def test_truncated_stream_and_missing_split_are_errors(packed, tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        PackedSplit(tmp_path, seq_len=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("meta.json", "doc_offsets.npy"):
        (broken / f).write_bytes((packed[2] / f).read_bytes())
    (broken / "tokens.bin").write_bytes((packed[2] / "tokens.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="missing or not"):
        PackedSplit(broken, seq_len=8)[0]


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
