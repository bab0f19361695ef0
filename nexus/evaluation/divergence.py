"""Divergent-token metrics (Deiseroth et al., 2024, "Divergent Token Metrics"): how closely a changed
model (an MoE after an extension) still generates what a reference model (the MoE before it) does.

For each prompt p, the reference R continues greedily: y_1 … y_N (KV-cached, `generate`). The other
model M reads the same text teacher-forced and predicts greedily at every position:

    m_t   = argmax M(p, y_<t)                       t = 1 … N
    FDT   = min {t : m_t ≠ y_t} − 1                 the first divergent token (0-based; none: never)
    share = (1/N) · Σ_t [m_t ≠ y_t]                 the share of divergent tokens

Teacher forcing keeps every position comparable after the first divergence (free-running outputs
differ everywhere after it). A model against itself never diverges; `first` is None for such prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nexus.evaluation.generation import generate
from nexus.model.transformer import Transformer


@dataclass
class Divergence:
    """Divergent-token metrics over a set of prompts."""

    first: list[int | None]
    """Per prompt: the 0-based position of the first divergent token, None if it never diverged."""
    share: float
    """Divergent tokens over all generated tokens."""
    new_tokens: int

    @property
    def never(self) -> float:
        """The share of prompts whose continuation never diverged."""
        return sum(f is None for f in self.first) / max(1, len(self.first))

    def _positions(self) -> np.ndarray:
        """First divergent positions, a never-diverging prompt counted as `new_tokens` (censored)."""
        return np.array([self.new_tokens if f is None else f for f in self.first], dtype=float)

    @property
    def mean_first(self) -> float:
        return float(self._positions().mean()) if self.first else float("nan")

    @property
    def median_first(self) -> float:
        return float(np.median(self._positions())) if self.first else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "share": self.share,
            "new_tokens": self.new_tokens,
            "never": self.never,
            "mean_first": self.mean_first,
            "median_first": self.median_first,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Divergence:
        return cls(list(data["first"]), float(data["share"]), int(data["new_tokens"]))


def held_out_prompts(tokens: Any, n_prompts: int, prompt_len: int) -> torch.Tensor:
    """`n_prompts` prompts of `prompt_len` tokens, evenly spaced over a held-out token stream: (n, T)."""
    ids = torch.as_tensor(np.asarray(tokens[:], dtype=np.int64))
    span = len(ids) - prompt_len
    if span < 0:
        raise ValueError(f"divergence prompts: {len(ids)} tokens cannot hold a {prompt_len}-token prompt")
    starts = np.linspace(0, span, num=n_prompts).astype(np.int64)
    return torch.stack([ids[s : s + prompt_len] for s in starts])


@torch.no_grad()
def divergence(
    reference: Transformer, other: Transformer, prompts: torch.Tensor, new_tokens: int, batch_size: int = 16
) -> Divergence:
    """Divergent-token metrics of `other` against `reference`'s greedy continuations of `prompts` (B, T);
    T + new_tokens must fit both models' context (no sliding window)."""
    length = prompts.shape[1] + new_tokens
    if length - 1 > min(reference.config.max_seq_len, other.config.max_seq_len):
        raise ValueError(f"divergence: prompt + continuation ({length - 1} tokens read) exceeds max_seq_len")
    first: list[int | None] = []
    diverged = 0
    for start in range(0, prompts.shape[0], batch_size):
        p = prompts[start : start + batch_size].to(reference.tok_emb.weight.device)
        seq = generate(reference, p, new_tokens)  # (B, T + N)
        y = seq[:, p.shape[1] :]
        logits = other(seq[:, :-1].to(other.tok_emb.weight.device)).logits[:, p.shape[1] - 1 :]
        differs = (logits.argmax(-1).to(y.device) != y).cpu()
        diverged += int(differs.sum())
        first += [int(row.nonzero()[0]) if row.any() else None for row in differs]
    return Divergence(first, diverged / max(1, len(first) * new_tokens), new_tokens)


def divergence_by_domain(
    reference: Transformer,
    other: Transformer,
    prompts: Mapping[str, torch.Tensor],
    new_tokens: int,
    batch_size: int = 16,
) -> dict[str, Divergence]:
    """`divergence` per domain, `prompts` {domain: (B, T)}."""
    return {d: divergence(reference, other, p, new_tokens, batch_size) for d, p in prompts.items()}
