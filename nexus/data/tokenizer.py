"""Byte-level BPE tokenizer: trained with `tokenizers` on a sample of the initial domains (never the
held-out extension domain), saved as `tokenizer.json`, loaded as a `transformers` fast tokenizer.

Byte-level BPE with no normaliser is lossless: `decode(encode(text)) == text` for any string, so
the packed token stream decodes back to the documents exactly (tests check this per domain).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nexus.errors import DataError
from nexus.io import atomic_write

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: Path, eos_token: str = EOS_TOKEN, min_frequency: int = 2
) -> Path:
    """Train a byte-level BPE on `texts` and write it atomically to `out_path` (a tokenizer.json).

    The 256 byte symbols are always in the vocabulary (any input encodes); special tokens come
    first: id 0 is `eos_token`, id 1 the padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[eos_token, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write(Path(out_path), lambda tmp: tok.save(tmp))
    return Path(out_path)


def load_tokenizer(path: str | Path, eos_token: str = EOS_TOKEN):
    """A `transformers.PreTrainedTokenizerFast` from a tokenizer.json file or a local tokenizer dir.

    Exposes `.eos_token_id` and `len(tok)` (the vocabulary size, special tokens included).
    Decoding never "cleans up" spaces, and special-token strings inside a text are encoded as
    plain text (`split_special_tokens`), so decode(encode(text)) round-trips and the EOS id only
    ever appears where packing put it.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file() and not (path / "tokenizer_config.json").exists():
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise DataError(f"tokenizer: {path} does not exist")
    if path.is_file():
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            eos_token=eos_token,
            pad_token=PAD_TOKEN,
            clean_up_tokenization_spaces=False,
            split_special_tokens=True,
        )
    else:
        tok = AutoTokenizer.from_pretrained(
            str(path),
            local_files_only=True,
            use_fast=True,
            clean_up_tokenization_spaces=False,
            split_special_tokens=True,
        )
    if tok.eos_token_id is None or tok.convert_tokens_to_ids(tok.eos_token) == tok.unk_token_id:
        raise DataError(f"tokenizer {path}: no EOS token {tok.eos_token!r} in the vocabulary")
    return tok


def sample_texts(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    """The first texts whose total length stays within `max_chars` (at least one)."""
    total = 0
    for text in texts:
        if total and total + len(text) > max_chars:
            return
        total += len(text)
        yield text
