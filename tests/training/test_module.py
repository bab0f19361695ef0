import pytest
import torch
import torch.nn.functional as F

from nexus.config import tiny
from nexus.model.transformer import Transformer
from nexus.training import CausalLMModule, MixtureDataModule, TrainConfig
from nexus.training.synthetic import synthetic_splits

TRAIN, VAL = synthetic_splits(["a", "b"], seq_len=16, vocab_size=96, n_train=16, n_val=6)


def test_per_domain_validation_loss_is_token_weighted_cross_entropy(cpu_trainer):
    model = Transformer(tiny(max_seq_len=16))
    dm = MixtureDataModule(TRAIN, VAL, {"a": 1}, batch_size=4, max_steps=1)
    module = CausalLMModule(model, TrainConfig(max_steps=1), dm.domain_names)
    trainer = cpu_trainer()
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    model.eval()
    with torch.no_grad():
        losses = {}
        for d in ("a", "b"):
            seqs = torch.stack([torch.as_tensor(VAL[d][i]) for i in range(len(VAL[d]))])
            losses[d] = F.cross_entropy(
                model(seqs[:, :-1]).logits.flatten(0, 1), seqs[:, 1:].flatten()
            ).item()
    assert metrics["val/a/loss"] == pytest.approx(losses["a"], rel=1e-5)
    assert metrics["val/b/loss"] == pytest.approx(losses["b"], rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(
        (losses["a"] + losses["b"]) / 2, rel=1e-5
    )  # equal token counts
    assert metrics["val/a/ppl"] == pytest.approx(torch.tensor(losses["a"]).exp().item(), rel=1e-4)


def test_moe_training_adds_aux_loss_and_logs_routing_shares(cpu_trainer):
    model = Transformer(
        tiny(max_seq_len=16).with_moe(expert_names=["a", "b"], router="linear", z_loss_coef=1e-3)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(
        max_steps=3, batch_size=4, val_every_n_steps=3, limit_val_batches=1, log_every_n_steps=1
    )
    dm = MixtureDataModule(TRAIN, VAL, {"a": 1, "b": 1}, cfg.batch_size, cfg.max_steps)
    module = CausalLMModule(model, cfg, dm.domain_names)
    trainer = cpu_trainer(
        max_steps=3,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert m["train/aux_loss"] > 0 and m["train/z_loss"] > 0 and m["train/load_balance_loss"] >= 1.0 - 1e-4
    assert m["train/lr"] == pytest.approx(
        cfg.lr * 0.1 + cfg.lr * 0.9 * 0.5 * (1 + torch.cos(torch.tensor(2 / 3 * torch.pi)).item())
    )
    for d in ("a", "b"):
        assert m[f"val/routing/layer1/{d}/a"] + m[f"val/routing/layer1/{d}/b"] == pytest.approx(1.0)
    assert module.last_val_step == 3
    router = "blocks.0.ffn.router.weight"
    assert not torch.equal(before[router], model.state_dict()[router])  # the aux loss reaches the router


def test_optimizer_decays_matrices_only():
    module = CausalLMModule(Transformer(tiny()), TrainConfig(max_steps=10, weight_decay=0.1), ["a"])
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
