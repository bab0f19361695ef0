"""Byte-level BPE: trained on the initial domains, lossless on every domain (code included)."""

from pathlib import Path

import pytest

from nexus.data.config import SourceConfig
from nexus.data.formats import list_files, parse_files
from nexus.data.presets import TINY_FORMATS
from nexus.data.tokenizer import load_tokenizer, sample_texts, train_tokenizer
from nexus.errors import DataError

CORPORA = Path(__file__).parents[1] / "fixtures" / "corpora"


def domain_texts(name):
    fmt = TINY_FORMATS[name]
    src = SourceConfig("folder", path=str(CORPORA / name), format=fmt)
    return [t for t, _ in parse_files(list_files(str(CORPORA / name), fmt, name), fmt, name, src)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    initial = [t for name in ("dictionary", "kernel-docs", "python-docs", "lore") for t in domain_texts(name)]
    return train_tokenizer(initial, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_vocab_size_and_eos(tok_path):
    tok = load_tokenizer(tok_path)
    assert len(tok) == 512 and tok.eos_token_id == 0 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert load_tokenizer(tok_path.parent).eos_token_id == 0  # a directory holding tokenizer.json works too


@pytest.mark.parametrize("domain", list(TINY_FORMATS))
def test_round_trip_in_every_domain_including_held_out_code(tok_path, domain):
    tok = load_tokenizer(tok_path)
    for text in domain_texts(domain):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.eos_token_id not in ids


def test_special_token_text_inside_a_document_is_not_eos(tok_path):
    tok = load_tokenizer(tok_path)
    text = "GPT-2 separates documents with <|endoftext|> tokens.\t ünïcödé 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids and tok.decode(ids) == text


def test_existing_local_tokenizer_directory(tok_path, tmp_path):
    saved = tmp_path / "hf-tok"
    load_tokenizer(tok_path).save_pretrained(str(saved))
    tok = load_tokenizer(saved)
    assert (
        tok.eos_token_id == 0
        and tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    )


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")


def test_sample_texts_respects_the_budget():
    assert list(sample_texts(["aaaa", "bb", "cccc"], 6)) == ["aaaa", "bb"]
    assert list(sample_texts(["aaaaaaaa"], 3)) == ["aaaaaaaa"]
