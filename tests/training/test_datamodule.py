from collections import Counter

import numpy as np
import pytest
import torch

from nexus.errors import DataError
from nexus.training.datamodule import MixtureBatchSampler, MixtureDataModule
from nexus.training.synthetic import synthetic_splits

TRAIN, VAL = synthetic_splits(["a", "b", "c"], seq_len=8, vocab_size=50, n_train=20, n_val=5)


def _dm(weights, max_steps=10, **kw):
    return MixtureDataModule(TRAIN, VAL, weights, batch_size=4, max_steps=max_steps, **kw)


def test_batches_are_tokens_and_domain_ids():
    dm = _dm({"b": 1.0})
    tokens, domains = next(iter(dm.train_dataloader()))
    assert tokens.shape == (4, 9) and tokens.dtype == torch.long
    assert domains.tolist() == [1, 1, 1, 1]  # position of "b" in dm.domain_names
    assert dm.domain_names == ["a", "b", "c"] and len(dm.train_dataloader()) == 10


def test_single_domain_trains_on_it_but_validates_on_all():
    dm = _dm({"a": 1.0, "b": 0.0})
    assert list(dm.weights) == ["a"]
    ids = {int(d) for _, domains in dm.train_dataloader() for d in domains}
    assert ids == {0}
    val = dm.val_dataloader()
    assert len(val) == 3 and [int(next(iter(dl))[1][0]) for dl in val] == [0, 1, 2]
    torch.testing.assert_close(next(iter(val[2]))[0][0], torch.as_tensor(VAL["c"][0]))


def test_mixture_proportions_follow_weights():
    sampler = MixtureBatchSampler({"x": 100, "y": 100}, {"x": 0.75, "y": 0.25}, batch_size=64, total_steps=50)
    counts = Counter(i >= 100 for batch in sampler for i in batch)
    assert counts[False] / (64 * 50) == pytest.approx(0.75, abs=0.02)


def test_each_epoch_of_a_domain_is_a_permutation():
    batches = list(MixtureBatchSampler({"x": 8}, {"x": 1.0}, batch_size=4, total_steps=4, seed=3))
    assert sorted(batches[0] + batches[1]) == list(range(8)) and sorted(batches[2] + batches[3]) == list(
        range(8)
    )
    assert batches[:2] != batches[2:]  # a new permutation per epoch


def test_state_at_a_step_is_exact_despite_prefetching():
    sizes, weights = {"x": 5, "y": 7}, {"x": 0.5, "y": 0.5}
    a = MixtureBatchSampler(sizes, weights, 3, total_steps=8, seed=1)
    it = iter(a)
    first = [next(it) for _ in range(5)]  # batches 0..4 drawn; only 0..2 "trained on"
    b = MixtureBatchSampler(sizes, weights, 3, total_steps=8, seed=1, start_step=3, state=a.state_at(3))
    rest = list(b)
    assert len(rest) == len(b) == 5 and rest[:2] == first[3:] and rest[2:] == list(it)
    with pytest.raises(DataError, match="no sampler state"):
        a.state_at(1)  # forgotten once step 3 was checkpointed


def test_state_dict_resumes_the_stream_and_checks_the_data():
    dm = _dm({"a": 1, "c": 1})
    full = [t for t, _ in dm.train_dataloader()]
    state = {"step": 6, "sampler": dm.train_sampler.state_at(6), "fingerprint": dm.fingerprint}
    resumed = _dm({"a": 1, "c": 1})
    resumed.load_state_dict(state)
    assert all(
        torch.equal(x, y) for x, y in zip(full[6:], [t for t, _ in resumed.train_dataloader()], strict=True)
    )
    other = MixtureDataModule(TRAIN, VAL, {"a": 1}, 4, 10, fingerprint="other")
    with pytest.raises(DataError, match="other data"):
        other.load_state_dict(state)


def test_fingerprint_identifies_the_splits():
    train2, val2 = synthetic_splits(["a", "b", "c"], seq_len=8, vocab_size=50, n_train=21, n_val=5)
    assert _dm({"a": 1}).fingerprint == _dm({"b": 1}).fingerprint  # same data, other weights
    assert MixtureDataModule(train2, val2, {"a": 1}, 4, 10).fingerprint != _dm({"a": 1}).fingerprint


def test_accepts_tuple_items_and_rejects_bad_weights():
    train = {"x": [(np.arange(9), 7)] * 3}
    dm = MixtureDataModule(train, {}, {"x": 1}, 2, 1, fingerprint="f")
    tokens, domains = next(iter(dm.train_dataloader()))
    assert tokens[0].tolist() == list(range(9)) and domains.tolist() == [0, 0]
    with pytest.raises(DataError, match="without training data"):
        _dm({"zzz": 1.0})
    with pytest.raises(DataError, match="select no domain"):
        _dm({"a": 0.0})
    with pytest.raises(DataError, match="no full sequence"):
        MixtureDataModule({"x": []}, {}, {"x": 1}, 2, 1, fingerprint="f")


def test_data_parallel_ranks_split_one_global_batch():
    sizes, weights = {"x": 50, "y": 30}, {"x": 0.6, "y": 0.4}
    single = list(MixtureBatchSampler(sizes, weights, 4, total_steps=3, seed=5))
    ranks = [list(MixtureBatchSampler(sizes, weights, 2, 3, seed=5, rank=r, world_size=2)) for r in range(2)]
    for step in range(3):
        assert ranks[0][step] == single[step][0::2] and ranks[1][step] == single[step][1::2]
