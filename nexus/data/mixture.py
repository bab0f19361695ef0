"""Domain mixtures: stage weights and a deterministic, resumable sampler over packed domains.

Weights of a stage (all normalised to sum to 1):
  - proportional: w_d = tokens_d / sum tokens (the paper's default);
  - uniform:      w_d = 1 / n;
  - explicit:     given weights, renormalised;
  - `blend(stage, general, share)`: (1 - share) * stage + share * general, e.g. the MoE stage with
    a share of the general/seed mix, or the extension finetune:
    `blend({new: 1}, previous, 1 - 0.5)` = 50 % new domain, 50 % previous domains.

`MixtureSampler` draws a domain by weight, then the next index of that domain's own shuffled
order (a fresh permutation each epoch of the domain), and yields `(domain, index)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nexus.data.config import MixtureConfig
from nexus.errors import DataError


def _normalise(weights: Mapping[str, float], what: str) -> dict[str, float]:
    total = float(sum(weights.values()))
    if not weights or total <= 0 or any(w < 0 for w in weights.values()):
        raise DataError(f"{what}: weights must be >= 0 with a positive sum, got {dict(weights)}")
    return {d: float(w) / total for d, w in weights.items()}


def mixture_weights(
    token_counts: Mapping[str, int],
    weighting: str = "proportional",
    explicit: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Weights over the domains of `token_counts` (see the module doc)."""
    if weighting == "proportional":
        return _normalise(token_counts, "proportional mixture")
    if weighting == "uniform":
        return _normalise(dict.fromkeys(token_counts, 1.0), "uniform mixture")
    if weighting == "explicit":
        missing = set(explicit or {}) - set(token_counts)
        if explicit is None or missing:
            raise DataError(f"explicit mixture: weights for unknown domains {sorted(missing)}")
        return _normalise({d: explicit.get(d, 0.0) for d in token_counts}, "explicit mixture")
    raise DataError(f"mixture weighting {weighting!r} is not proportional|uniform|explicit")


def blend(stage: Mapping[str, float], general: Mapping[str, float], share: float) -> dict[str, float]:
    """(1 - share) * stage + share * general, over the union of their domains."""
    if not 0 <= share <= 1:
        raise DataError(f"mixture blend: share {share} is not in [0, 1]")
    a, b = _normalise(stage, "mixture blend"), _normalise(general, "mixture blend")
    return {d: (1 - share) * a.get(d, 0.0) + share * b.get(d, 0.0) for d in {**a, **b}}


class MixtureSampler:
    """Infinite, deterministic stream of `(domain, index)` with `index < sizes[domain]`.

    sizes: number of items (e.g. `len(PackedSplit)`) per domain; weights: per domain (renormalised;
    zero-weight domains are never drawn). Given the same sizes, weights and seed, the stream is
    always the same; `state_dict()` / `load_state_dict()` save and restore the position exactly
    (put it in the training checkpoint to resume mid-epoch).
    """

    def __init__(self, sizes: Mapping[str, int], weights: Mapping[str, float], seed: int = 0):
        unknown = set(weights) - set(sizes)
        if unknown:
            raise DataError(f"mixture sampler: weights for domains without data {sorted(unknown)}")
        self.weights = _normalise({d: weights.get(d, 0.0) for d in sizes}, "mixture sampler")
        empty = [d for d, w in self.weights.items() if w > 0 and sizes[d] < 1]
        if empty:
            raise DataError(f"mixture sampler: domains {empty} have weight but no sequences")
        self.domains = list(sizes)
        self.sizes = {d: int(n) for d, n in sizes.items()}
        self.seed = seed
        self._probs = np.array([self.weights[d] for d in self.domains])
        self._rng = np.random.default_rng(seed)
        self._epoch = dict.fromkeys(self.domains, 0)
        self._pos = dict.fromkeys(self.domains, 0)
        self._perm: dict[str, np.ndarray] = {}
        self.draws = 0

    def _permutation(self, domain: str) -> np.ndarray:
        perm = self._perm.get(domain)
        if perm is None:
            key = [self.seed, self.domains.index(domain), self._epoch[domain]]
            perm = self._perm[domain] = np.random.default_rng(key).permutation(self.sizes[domain])
        return perm

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return self

    def __next__(self) -> tuple[str, int]:
        domain = self.domains[int(self._rng.choice(len(self.domains), p=self._probs))]
        if self._pos[domain] >= self.sizes[domain]:
            self._epoch[domain] += 1
            self._pos[domain] = 0
            self._perm.pop(domain, None)
        index = int(self._permutation(domain)[self._pos[domain]])
        self._pos[domain] += 1
        self.draws += 1
        return domain, index

    def take(self, n: int) -> list[tuple[str, int]]:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """Plain Python data (JSON/torch.save friendly)."""
        return {
            "seed": self.seed,
            "draws": self.draws,
            "rng": self._rng.bit_generator.state,
            "epoch": dict(self._epoch),
            "pos": dict(self._pos),
            "sizes": dict(self.sizes),
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["sizes"] != self.sizes or state["seed"] != self.seed:
            raise DataError(
                f"mixture sampler state is for sizes={state['sizes']} seed={state['seed']}, "
                f"not sizes={self.sizes} seed={self.seed}"
            )
        self._rng.bit_generator.state = state["rng"]
        self._epoch, self._pos = dict(state["epoch"]), dict(state["pos"])
        self._perm.clear()
        self.draws = state["draws"]


STAGES = ("seed", "expert", "moe", "extension")


def stage_weights(
    stage: str,
    token_counts: Mapping[str, int],
    initial: Sequence[str],
    cfg: MixtureConfig,
    domain: str | None = None,
) -> dict[str, float]:
    """Domain weights of a training stage.

    seed:      the general mix: proportional over the initial domains;
    expert:    `domain` only (phase 1);
    moe:       the initial domains weighted by `cfg.weighting`, blended with `cfg.general_share`
               of the general mix (phase 2);
    extension: `cfg.extension_new_share` of the new `domain`, the rest the previous domains
               weighted by `cfg.weighting` (phase 3).
    """
    general = mixture_weights({d: token_counts[d] for d in initial})
    if stage == "seed":
        return general
    if stage in ("expert", "extension") and domain not in token_counts:
        raise DataError(f"mixture stage {stage!r}: unknown domain {domain!r}; known: {sorted(token_counts)}")
    if stage == "expert":
        return {domain: 1.0}
    previous = [d for d in initial if d != domain]
    explicit = {d: w for d, w in (cfg.weights or {}).items() if d in previous} if cfg.weights else None
    mix = mixture_weights({d: token_counts[d] for d in previous}, cfg.weighting, explicit)
    if stage == "moe":
        return blend(mix, general, cfg.general_share)
    if stage == "extension":
        return blend({domain: 1.0}, mix, 1 - cfg.extension_new_share)
    raise DataError(f"mixture stage {stage!r} is not one of {STAGES}")
