"""Held-out perplexity and bits per byte, for dense and MoE checkpoints alike.

    loss = (1/N) Σ_t -log p(x_t | x_<t)        perplexity = exp(loss)
    bits_per_byte = Σ_t -log p(x_t | x_<t) / (B · ln 2)      B = UTF-8 bytes the N tokens decode to

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.

Two ways to cut text into model-sized windows, both scored by the same batched `score_windows`:
- `stream_windows`: a packed split (`doc EOS doc EOS ...`, the training tokenization) in
  non-overlapping windows of `seq_len`, exactly how training sees it (`split_perplexity`);
- `document_windows`: one document at a time, conditioned on a leading EOS, in rolling windows
  that predict every token once with up to `max_len` tokens of context (`text_perplexity`). This
  is lm-eval's `loglikelihood_rolling`, so `text_perplexity` equals what lm-eval reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nexus.model.transformer import ModelOutput, Transformer


@dataclass(frozen=True)
class Window:
    """One forward pass: `targets[i]` is the token after `input_ids[i]`; only the last `n_scored`
    targets count (the others are context already scored by an earlier window)."""

    input_ids: Sequence[int]
    targets: Sequence[int]
    n_scored: int


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens spanning `bytes` bytes."""

    nll: float
    tokens: int
    bytes: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2)) if self.bytes else math.nan

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes) if self.bytes else math.nan

    def to_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "byte_perplexity": self.byte_perplexity,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }


def stream_windows(tokens: Sequence[int] | np.ndarray, seq_len: int) -> list[Window]:
    """Non-overlapping windows over a token stream: every token but the first is predicted once,
    with the context training gives it. The last window may be shorter."""
    tokens = np.asarray(tokens, dtype=np.int64)
    windows = []
    for start in range(0, max(len(tokens) - 1, 0), seq_len):
        chunk = tokens[start : start + seq_len + 1]
        windows.append(Window(chunk[:-1], chunk[1:], len(chunk) - 1))
    return windows


def document_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[Window]:
    """Rolling windows over one document preceded by `prefix_id` (EOS, as in the packed stream).

    The first window predicts the first `max_len` tokens; each later one predicts the next
    `max_len` tokens (fewer at the end) from the `max_len` tokens before its last target."""
    seq = [prefix_id, *tokens]
    n = len(tokens)
    if n == 0:
        return []
    first = min(max_len, n)
    windows = [Window(seq[:first], seq[1 : first + 1], first)]
    predicted = first
    while predicted < n:
        end = min(predicted + max_len, n)  # seq index of the last target
        windows.append(Window(seq[end - max_len : end], seq[end - max_len + 1 : end + 1], end - predicted))
        predicted = end
    return windows


@dataclass
class WindowBatch:
    """A forward pass over right-padded windows. `valid` marks real (non-pad) positions, `scored`
    the positions whose targets count; `index` maps rows back to the windows list."""

    index: list[int]
    output: ModelOutput
    targets: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool
    scored: torch.Tensor  # (B, T) bool


@torch.no_grad()
def forward_windows(
    model: Transformer, windows: Sequence[Window], batch_size: int = 8
) -> Iterator[WindowBatch]:
    """Run `model` over `windows` in batches of similar length (longest first), right-padded.

    Padding sits after the real tokens, so causal attention and per-token routing leave the real
    positions' outputs unchanged."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = len(windows[index[0]].input_ids)
        inputs = torch.zeros(len(index), width, dtype=torch.long)
        targets = torch.zeros_like(inputs)
        valid = torch.zeros(len(index), width, dtype=torch.bool)
        scored = torch.zeros_like(valid)
        for row, i in enumerate(index):
            w = windows[i]
            n = len(w.input_ids)
            inputs[row, :n] = torch.as_tensor(np.asarray(w.input_ids, dtype=np.int64))
            targets[row, :n] = torch.as_tensor(np.asarray(w.targets, dtype=np.int64))
            valid[row, :n] = True
            scored[row, n - w.n_scored : n] = True
        output = model(inputs.to(device))
        yield WindowBatch(index, output, targets.to(device), valid.to(device), scored.to(device))


def score_windows(
    model: Transformer, windows: Sequence[Window], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """Per window: (sum of the scored targets' log-probabilities, whether each is the argmax)."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    for batch in forward_windows(model, windows, batch_size):
        logprobs = F.log_softmax(batch.output.logits.float(), dim=-1)
        target_lp = logprobs.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        greedy = (logprobs.argmax(-1) == batch.targets) | ~batch.scored
        sums = (target_lp * batch.scored).double().sum(-1)
        for row, i in enumerate(batch.index):
            results[i] = (sums[row].item(), bool(greedy[row].all()))
    return results


def token_array(split: Any) -> np.ndarray:
    """Token ids of a packed split (`nexus.data.packing.PackedSplit` or anything with `.tokens`),
    a numpy array, a tensor or a list."""
    tokens = getattr(split, "tokens", split)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens, dtype=np.int64)


def stream_bytes(tokens: Sequence[int] | np.ndarray, tokenizer: Any) -> int:
    """UTF-8 bytes of the predicted part of a packed stream (all but its first token); each
    document separator (EOS) counts as one byte."""
    ids = token_array(tokens)[1:]
    n_eos = int((ids == tokenizer.eos_token_id).sum())
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    return len(text.encode("utf-8")) + n_eos


def split_perplexity(
    model: Transformer,
    split: Any,
    tokenizer: Any | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> Perplexity:
    """Perplexity of a packed held-out split in training-style windows of `seq_len` (default the
    model's max_seq_len); bits per byte too when `tokenizer` is given."""
    tokens = token_array(split)
    windows = stream_windows(tokens, seq_len or model.config.max_seq_len)
    nll = -sum(lp for lp, _ in score_windows(model, windows, batch_size))
    n_bytes = stream_bytes(tokens, tokenizer) if tokenizer is not None else 0
    return Perplexity(nll, sum(w.n_scored for w in windows), n_bytes)


def domain_perplexities(
    model: Transformer,
    splits: Mapping[str, Any],
    tokenizer: Any | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict[str, Perplexity]:
    """`split_perplexity` for every `{domain: held-out split}`."""
    return {
        domain: split_perplexity(model, split, tokenizer, seq_len, batch_size)
        for domain, split in splits.items()
    }


def text_perplexity(
    model: Transformer, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_len: int | None = None
) -> Perplexity:
    """Perplexity of documents given as text, each scored on its own after an EOS (lm-eval's
    `loglikelihood_rolling`); bytes are the texts' UTF-8 bytes."""
    max_len = max_len or model.config.max_seq_len
    windows: list[Window] = []
    n_tokens = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        n_tokens += len(ids)
        windows.extend(document_windows(ids, tokenizer.eos_token_id, max_len))
    nll = -sum(lp for lp, _ in score_windows(model, windows, batch_size))
    return Perplexity(nll, n_tokens, sum(len(t.encode("utf-8")) for t in texts))


def evaluate_checkpoints(
    checkpoints: Mapping[str, str | Path],
    splits: Mapping[str, Any],
    tokenizer: Any | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Perplexity]]:
    """`{model name: {domain: Perplexity}}` for checkpoint directories that share the splits'
    tokenizer (by default the first checkpoint's `tokenizer.json`)."""
    from nexus.checkpoint import load_checkpoint

    results = {}
    for name, path in checkpoints.items():
        if tokenizer is None and (Path(path) / "tokenizer.json").is_file():
            from nexus.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(Path(path) / "tokenizer.json")
        model = load_checkpoint(path, device=device, dtype=dtype)
        results[name] = domain_perplexities(model, splits, tokenizer, batch_size=batch_size)
        del model
    return results
