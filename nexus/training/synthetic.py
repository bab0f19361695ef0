"""Synthetic per-domain token data with the `PackedSplit` item interface, for tests and benchmarks.

Domain d's sequences are arithmetic progressions `t_j = (a + (d + 1) · j) mod V` with a random
offset `a` and 10 % random tokens, so each domain is learnable and distinguishable from the others.
"""

from __future__ import annotations

import numpy as np

from nexus.data.cache import fingerprint


class SyntheticDomain:
    def __init__(
        self, domain_index: int, n_sequences: int, seq_len: int, vocab_size: int, seed: int = 0
    ) -> None:
        self.domain_index, self.n, self.seq_len, self.vocab_size, self.seed = (
            domain_index,
            n_sequences,
            seq_len,
            vocab_size,
            seed,
        )
        self.fingerprint = fingerprint(["synthetic", domain_index, n_sequences, seq_len, vocab_size, seed])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.domain_index, i])
        j = np.arange(self.seq_len + 1)
        tokens = (rng.integers(self.vocab_size) + (self.domain_index + 1) * j) % self.vocab_size
        noise = rng.random(j.shape) < 0.1
        tokens[noise] = rng.integers(self.vocab_size, size=int(noise.sum()))
        return tokens.astype(np.int64)


def synthetic_splits(
    domains: list[str], seq_len: int, vocab_size: int, n_train: int = 64, n_val: int = 8, seed: int = 0
) -> tuple[dict[str, SyntheticDomain], dict[str, SyntheticDomain]]:
    """`(train, val)` mappings domain -> dataset, disjoint by seed."""
    train = {d: SyntheticDomain(i, n_train, seq_len, vocab_size, seed) for i, d in enumerate(domains)}
    val = {d: SyntheticDomain(i, n_val, seq_len, vocab_size, seed + 1) for i, d in enumerate(domains)}
    return train, val
