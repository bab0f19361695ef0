"""Packing: documents -> one token stream per (domain, split) -> fixed-length training sequences.

On disk, a packed split is a directory:
  tokens.bin       the stream `doc_0 EOS doc_1 EOS ...` as raw uint16 (uint32 if vocab > 65535)
  doc_offsets.npy  int64 start of each document in the stream (num_documents + 1 entries)
  meta.json        domain, split, dtype, counts, eos_id, vocab_size, fingerprint
Training memory-maps `tokens.bin` (no re-tokenising) through `PackedSplit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nexus.errors import DataError

STREAM_FILE, OFFSETS_FILE, META_FILE = "tokens.bin", "doc_offsets.npy", "meta.json"
_TOKENIZERS: dict[str, Any] = {}  # per-process cache for datasets.map workers


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encode_batch(batch: dict[str, list], tokenizer_file: str, eos_id: int) -> dict[str, list]:
    tok = _TOKENIZERS.get(tokenizer_file)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZERS[tokenizer_file] = Tokenizer.from_file(tokenizer_file)
        tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not EOS
    encodings = tok.encode_batch(batch["text"], add_special_tokens=False)
    return {"ids": [enc.ids + [eos_id] for enc in encodings]}


def pack_documents(
    docs,
    tokenizer_file: Path,
    out_dir: Path,
    *,
    domain: str,
    split: str,
    fingerprint: str,
    eos_id: int,
    vocab_size: int,
    num_proc: int = 1,
    batch_size: int = 1000,
) -> dict[str, int]:
    """Tokenize a documents `datasets.Dataset` (column `text`) into `out_dir` (see module doc).

    Tokenization is batched and runs in `num_proc` processes (datasets.map); its Arrow cache is
    written inside `out_dir` and removed once the stream is written. Returns the counts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tokenized = docs.map(
        _encode_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if len(docs) > 1 else None,
        remove_columns=docs.column_names,
        fn_kwargs={"tokenizer_file": str(tokenizer_file), "eos_id": eos_id},
        cache_file_name=str(out_dir / "tokenized.arrow"),
        new_fingerprint=f"{fingerprint[:16]}-{split}",
        desc=f"tokenize {domain}/{split}",
    )
    lengths = []  # one int64 array per batch: 8 bytes per document
    with open(out_dir / STREAM_FILE, "wb") as stream:
        for batch in tokenized.iter(batch_size=batch_size):
            arrays = [np.asarray(ids, dtype=dtype) for ids in batch["ids"]]
            lengths.append(np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays)))
            stream.write(np.concatenate(arrays).tobytes())
    del tokenized
    for arrow in out_dir.glob("tokenized*.arrow"):
        arrow.unlink()
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out_dir / OFFSETS_FILE, offsets)
    meta = {
        "domain": domain,
        "split": split,
        "dtype": dtype.name,
        "num_tokens": int(offsets[-1]),
        "num_documents": len(lengths),
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "fingerprint": fingerprint,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return {"documents": meta["num_documents"], "tokens": meta["num_tokens"]}


class PackedSplit:
    """Fixed-length, memory-mapped view of one packed (domain, split).

    `split[i]` is an int64 numpy array of shape (seq_len + 1,): `tokens[i*L : i*L + L + 1]`.
    Use `x = item[:-1]` as inputs and `y = item[1:]` as targets. Consecutive items overlap by one
    token, so every stream token but the first is a target exactly once; the last partial
    sequence (< L tokens) is not an item but stays in `tokens`. Picklable (for DataLoader
    workers): the memory map is reopened lazily in each process.
    """

    def __init__(self, path: str | Path, seq_len: int):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise DataError(f"packed split {self.path}: no {META_FILE} (run `nexus data prepare`)")
        if seq_len < 1:
            raise DataError(f"packed split {self.path}: seq_len must be >= 1, got {seq_len}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self.seq_len = seq_len
        self.domain: str = self.meta["domain"]
        self.split: str = self.meta["split"]
        self.fingerprint: str = self.meta["fingerprint"]
        self.num_tokens: int = self.meta["num_tokens"]
        self.num_documents: int = self.meta["num_documents"]
        self.eos_id: int = self.meta["eos_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream, memory-mapped, shape (num_tokens,)."""
        if self._tokens is None:
            dtype = np.dtype(self.meta["dtype"])
            expected = self.num_tokens * dtype.itemsize
            stream = self.path / STREAM_FILE
            if not stream.is_file() or stream.stat().st_size != expected:
                raise DataError(
                    f"packed split {self.domain}/{self.split}: {stream} is missing or not {expected} bytes"
                )
            self._tokens = np.memmap(stream, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        return np.load(self.path / OFFSETS_FILE)

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.domain}/{self.split} ({n} sequences)")
        start = (i % n) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}

    def __repr__(self) -> str:
        return (
            f"PackedSplit({self.domain}/{self.split}, {len(self)} x {self.seq_len}+1, "
            f"{self.num_tokens} tokens)"
        )
