"""The LightningDataModule of every stage: packed per-domain sequences, mixed by the stage's weights.

Inputs are map-style datasets per domain (e.g. `nexus.data.packing.PackedSplit`), each item a
`(seq_len + 1,)` token array (or a `(tokens, domain_id)` pair, whose id is ignored). Domains are
renumbered by their position in `domain_names`, so batches are `(tokens (B, T+1), domain_ids (B,))`.

Training draws from `nexus.data.mixture.MixtureSampler`: each row picks a domain with probability
proportional to its weight, then the next sequence of that domain's current permutation. The state
dict holds the step and the sampler state at that step, so resuming replays exactly the batches an
uninterrupted run would have seen, however many batches the DataLoader had prefetched. Validation
has one sequential loader per domain.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from nexus.data.cache import fingerprint as hash_json
from nexus.data.mixture import MixtureSampler
from nexus.errors import DataError


class _Labelled(Dataset):
    """`dataset[i]` as `(LongTensor (seq_len + 1,), domain_id)`."""

    def __init__(self, dataset: Dataset, domain_id: int) -> None:
        self.dataset, self.domain_id = dataset, domain_id

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[i]
        tokens = item[0] if isinstance(item, tuple) else item
        return torch.as_tensor(np.asarray(tokens), dtype=torch.long), self.domain_id


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` draws of a `nexus.data.mixture.MixtureSampler` (domains by weight,
    each domain's sequences in a fresh permutation per epoch), as indices into the concatenation
    of the domains' datasets, for steps `start_step .. total_steps - 1`.

    The mixture state before each yielded batch is kept until that step is checkpointed, so
    `state_at(step)` is exact however many batches the DataLoader has prefetched. Under data
    parallelism every rank draws the same global batch of `batch_size · world_size` and keeps the
    rows `rank::world_size`, so one (rank 0's) state resumes every rank. With gradient accumulation
    a step's rows are yielded as `micro_batches` consecutive micro-batches (steps stay the unit of
    the state), so the rows of a step do not depend on the number of micro-batches."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        weights: Mapping[str, float],
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        start_step: int = 0,
        state: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ) -> None:
        self.mixture = MixtureSampler(sizes, weights, seed)
        if state is not None:
            self.mixture.load_state_dict(state)
        self.offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist()))
        self.batch_size, self.total_steps, self.start_step = batch_size, total_steps, start_step
        self.rank, self.world_size, self.micro_batches = rank, world_size, micro_batches
        self._next_step = start_step
        self._states: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[list[int]]:
        while self._next_step < self.total_steps:
            self._states[self._next_step] = self.mixture.state_dict()
            self._next_step += 1
            draws = self.mixture.take(self.batch_size * self.world_size)[self.rank :: self.world_size]
            rows = [self.offsets[d] + i for d, i in draws]
            micro = self.batch_size // self.micro_batches
            for m in range(self.micro_batches):
                yield rows[m * micro : (m + 1) * micro]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.micro_batches

    def state_at(self, step: int) -> dict[str, Any]:
        """The mixture state before batch `step` was drawn (forgets earlier steps)."""
        for old in [s for s in self._states if s < step]:
            del self._states[old]
        if step == self._next_step:
            return self.mixture.state_dict()
        if step not in self._states:
            raise DataError(f"no sampler state for step {step} (drawn up to {self._next_step})")
        return self._states[step]


class MixtureDataModule(L.LightningDataModule):
    """Train on `train` domains mixed by `weights` (a single domain for an expert, the mix for MoE
    training, 50/50 new/old for extension finetuning); validate on every `val` domain.

    Domains with weight 0 are not trained on but are still validated (e.g. an expert's loss on the
    other domains). `fingerprint` identifies the data (defaults to a hash of the splits'
    `fingerprint` attributes); it becomes the MLflow dataset digest.
    """

    def __init__(
        self,
        train: Mapping[str, Dataset],
        val: Mapping[str, Dataset],
        weights: Mapping[str, float],
        batch_size: int,
        max_steps: int,
        seed: int = 0,
        num_workers: int = 0,
        fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(train))
        if unknown:
            raise DataError(
                f"mixture weights name domains without training data: {unknown}; have {sorted(train)}"
            )
        self.weights = {d: float(w) for d, w in weights.items() if w > 0}
        if not self.weights:
            raise DataError(f"mixture weights {dict(weights)} select no domain (all zero)")
        empty = sorted(d for d in self.weights if len(train[d]) == 0)  # type: ignore[arg-type]
        if empty:
            raise DataError(f"training split of domain(s) {empty} holds no full sequence")
        self.domain_names = list(dict.fromkeys([*train, *val]))
        ids = {d: i for i, d in enumerate(self.domain_names)}
        total = sum(self.weights.values())
        self.weights = {d: w / total for d, w in self.weights.items()}
        self.train_sets = {d: _Labelled(train[d], ids[d]) for d in self.weights}
        self.val_sets = {d: _Labelled(ds, ids[d]) for d, ds in val.items() if len(ds) > 0}  # type: ignore[arg-type]
        self.batch_size, self.max_steps, self.seed, self.num_workers = (
            batch_size,
            max_steps,
            seed,
            num_workers,
        )
        self.fingerprint = fingerprint or hash_json(
            {
                split: getattr(ds, "fingerprint", None)
                for split, ds in [
                    *((f"train/{d}", train[d]) for d in train),
                    *((f"val/{d}", val[d]) for d in val),
                ]
            }
        )
        self.start_step, self.start_state = 0, None
        self.micro_batches = 1
        """Micro-batches per step (gradient accumulation); the stage sets it from its TrainConfig."""
        self.train_sampler: MixtureBatchSampler | None = None

    def describe(self) -> dict[str, Any]:
        """What identifies this stage's data: part of the stage fingerprint and of the MLflow params."""
        return {
            "fingerprint": self.fingerprint,
            "weights": self.weights,
            "val_domains": sorted(self.val_sets),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def train_dataloader(self) -> DataLoader:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        self.train_sampler = MixtureBatchSampler(
            {d: len(ds) for d, ds in self.train_sets.items()},
            self.weights,
            self.batch_size,
            self.max_steps,
            self.seed,
            self.start_step,
            self.start_state,
            rank,
            world,
            self.micro_batches,
        )
        return DataLoader(
            ConcatDataset(list(self.train_sets.values())),
            batch_sampler=self.train_sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        # batch_size, not the micro-batch: `limit_val_batches` then covers the same sequences (no
        # activations are kept for a backward, so a validation batch needs far less memory)
        return [
            DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
            for ds in self.val_sets.values()
        ]

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step if self.trainer is not None else self.start_step
        sampler = self.train_sampler.state_at(step) if self.train_sampler is not None else self.start_state
        return {"step": int(step), "sampler": sampler, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                "the Lightning checkpoint was written for other data "
                f"({state.get('fingerprint')} != {self.fingerprint}); use a new output directory"
            )
        self.start_step, self.start_state = int(state["step"]), state["sampler"]


def packed_data_module(
    data_dir: str,
    weights: Mapping[str, float],
    batch_size: int,
    max_steps: int,
    seed: int = 0,
    val_domains: list[str] | None = None,
    extra_dirs: Mapping[str, str] | None = None,
    num_workers: int = 0,
) -> MixtureDataModule:
    """A MixtureDataModule over the packed splits of prepared data (`nexus.data.open_prepared`):
    train on `weights`' domains, validate on `val_domains` (default: the same); `extra_dirs` maps
    domains prepared in another directory (an extension's new domain)."""
    from nexus.data import open_prepared

    dirs = {d: (extra_dirs or {}).get(d, data_dir) for d in {*weights, *(val_domains or weights)}}
    opened = {p: open_prepared(p) for p in set(dirs.values())}
    return MixtureDataModule(
        {d: opened[dirs[d]].packed(d, "train") for d in weights},
        {d: opened[dirs[d]].packed(d, "validation") for d in (val_domains or weights)},
        weights,
        batch_size,
        max_steps,
        seed=seed,
        num_workers=num_workers,
    )
