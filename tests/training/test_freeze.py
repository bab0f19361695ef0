"""`TrainConfig.trainable` through the real Lightning Trainer: frozen tensors and frozen expert rows are
bit-identical after training, everything trainable moves."""

import pytest
import torch

from nexus.config import tiny
from nexus.errors import ConfigError
from nexus.model.transformer import Transformer
from nexus.training import MixtureDataModule, TrainConfig, train_moe
from nexus.training.freeze import apply_trainable, param_group
from nexus.training.synthetic import synthetic_splits
from nexus.upcycling import extend, upcycle

TRAIN, VAL = synthetic_splits(["a", "b"], seq_len=16, vocab_size=96, n_train=32, n_val=4)
MODEL = tiny(max_seq_len=16)


def _moe(router: str) -> Transformer:
    torch.manual_seed(0)
    seed, experts = Transformer(MODEL), [Transformer(MODEL) for _ in range(2)]
    moe = upcycle(seed, experts, domain_embeddings=torch.randn(2, 8), router=router, expert_names=["a", "b"])
    return extend(moe, Transformer(MODEL), domain_embedding=torch.randn(8), name="new")


def _finetune(tmp_path, router: str, trainable: list[str]):
    from nexus.checkpoint import load_checkpoint, save_checkpoint

    before = _moe(router)
    save_checkpoint(before, tmp_path / "init")
    cfg = TrainConfig(
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        val_every_n_steps=4,
        limit_val_batches=1,
        log_every_n_steps=2,
        progress_bar=False,
        trainable=trainable,
    )
    data = MixtureDataModule(TRAIN, VAL, {"a": 1.0, "b": 1.0}, cfg.batch_size, cfg.max_steps)
    result = train_moe(cfg, data, tmp_path / "run", init_checkpoint=tmp_path / "init")
    return before.state_dict(), load_checkpoint(result.checkpoint).state_dict()


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_new_expert_and_router_train_everything_else_stays_bit_identical(tmp_path, router):
    before, after = _finetune(tmp_path, router, ["router", "expert:new"])
    for key, tensor in before.items():
        group = param_group(key)
        if group == "experts":
            assert torch.equal(after[key][:2], tensor[:2]), (
                key
            )  # old experts: rows frozen, weight decay undone
            assert not torch.equal(after[key][2], tensor[2]), key  # the new expert trained
        elif group == "router":
            assert not torch.equal(after[key], tensor), key
        else:
            assert torch.equal(after[key], tensor), key  # shared expert, attention, embeddings, norms


def test_non_ffn_group_trains_only_attention_embeddings_and_norms(tmp_path):
    before, after = _finetune(tmp_path, "linear", ["non_ffn"])
    for key, tensor in before.items():
        moved = not torch.equal(after[key], tensor)
        if param_group(key) == "non_ffn" and "norm" not in key:
            assert moved, key
        elif param_group(key) != "non_ffn":
            assert not moved, key


def test_groups_set_requires_grad_and_unknown_names_fail():
    moe = _moe("nexus")
    assert apply_trainable(moe, ["all"]) is None and all(p.requires_grad for p in moe.parameters())
    rows = apply_trainable(moe, ["shared", "experts"])
    assert rows is None  # whole tensors only
    grads = {k: p.requires_grad for k, p in moe.named_parameters()}
    assert grads["blocks.0.ffn.experts.w_in"] and grads["blocks.0.ffn.shared.w_in.weight"]
    assert not grads["tok_emb.weight"] and not grads["blocks.0.ffn.router.proj.w_in.weight"]
    partial = apply_trainable(_moe("nexus"), ["expert:b"])
    assert partial is not None and all(rows == [0, 2] for _, rows in partial.params.values())
    with pytest.raises(ConfigError, match="unknown parameter group 'routers'"):
        TrainConfig(trainable=["routers"])
    with pytest.raises(ConfigError, match="no routed expert named"):
        apply_trainable(_moe("nexus"), ["expert:code"])
