"""What the Lightning training step backpropagates: `CE + Σ_layers (load_balance_coef · lb + z_loss_coef ·
z)`, recomputed here from the routing the model reports, and the router gradient it produces."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from nexus.config import tiny
from nexus.model.transformer import Transformer
from nexus.training import CausalLMModule, MixtureDataModule, TrainConfig
from nexus.training.synthetic import synthetic_splits

TRAIN, VAL = synthetic_splits(["a", "b"], seq_len=16, vocab_size=96, n_train=16, n_val=4)
ROUTER = "blocks.0.ffn.router.weight"


def switch_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """`n · Σ_i f_i · P_i` with f counted per assignment in Python (no gradient through f)."""
    n, chosen = probs.shape[1], expert_index.flatten().tolist()
    return n * sum(chosen.count(i) / len(chosen) * probs[:, i].mean() for i in range(n))


def expected_loss(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, CE) from scratch: next-token CE from the logits, plus each MoE layer's weighted Switch
    loss (recomputed from its probabilities and choices) and z loss (as the layer reports it: the router
    logits are not exposed; `test_moe.test_aux_loss_weights_and_z_loss` checks that value)."""
    moe = model.config.moe
    out = model(tokens[:, :-1])
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    aux = sum(
        moe.load_balance_coef * switch_loss(r.probs, r.expert_index) + moe.z_loss_coef * r.z_loss
        for r in out.routing
    )
    return lm + aux, lm


class Capture(L.Callback):
    """The first step's batch, the loss Lightning backpropagates, the expected loss and its router
    gradient (computed before the backward), and the router gradient the backward produced."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.seen["tokens"] = batch[0]

    def on_before_backward(self, trainer, pl_module, loss):
        if "loss" in self.seen:
            return
        model = pl_module.model
        want, lm = expected_loss(model, self.seen["tokens"])
        router = dict(model.named_parameters())[ROUTER]
        (grad,) = torch.autograd.grad(want, router)
        self.seen.update(loss=loss.detach().clone(), want=want.detach(), lm=lm.detach(), want_grad=grad)

    def on_after_backward(self, trainer, pl_module):
        if "grad" not in self.seen:
            self.seen["grad"] = dict(pl_module.model.named_parameters())[ROUTER].grad.detach().clone()


def _first_step(make_trainer, load_balance_coef: float, z_loss_coef: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same initial weights for every coefficient
    model = Transformer(
        tiny(max_seq_len=16).with_moe(
            expert_names=["a", "b", "c"],
            router="linear",
            top_k=2,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
        )
    )
    cfg = TrainConfig(max_steps=1, batch_size=4, log_every_n_steps=1)
    dm = MixtureDataModule(TRAIN, VAL, {"a": 1, "b": 1}, cfg.batch_size, cfg.max_steps)
    capture = Capture()
    trainer = make_trainer(max_steps=1, limit_val_batches=0, callbacks=[capture])
    trainer.fit(CausalLMModule(model, cfg, dm.domain_names), datamodule=dm)
    return capture.seen


@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_the_training_step_backpropagates_lm_loss_plus_weighted_aux_loss(cpu_trainer, z_loss_coef):
    seen = _first_step(cpu_trainer, load_balance_coef=0.5, z_loss_coef=z_loss_coef)
    # two layers, each Switch loss >= 1: the aux term is far above float noise
    assert seen["want"] - seen["lm"] > 0.9
    torch.testing.assert_close(seen["loss"], seen["want"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["grad"], seen["want_grad"], rtol=1e-4, atol=1e-7)


def test_the_coefficient_scales_the_aux_term_of_the_step(cpu_trainer):
    off, on = _first_step(cpu_trainer, load_balance_coef=0.0), _first_step(cpu_trainer, load_balance_coef=2.0)
    torch.testing.assert_close(off["loss"], off["lm"], rtol=1e-5, atol=1e-6)  # same seed, same batch
    torch.testing.assert_close(on["lm"], off["lm"])
    assert on["loss"] - on["lm"] > 3.0  # 2 layers x 2.0 x (Switch loss >= 1)
    assert not torch.allclose(on["grad"], off["grad"])  # the load-balancing gradient reaches the router
