"""The data-informed router entry: after the fit the new expert wins the new domain's tokens and
leaves the earlier domains' alone; a linear router changes only the new row, a Nexus router keeps
the earlier experts' embeddings."""

import pytest
import torch

from nexus.config import tiny
from nexus.model.transformer import Transformer
from nexus.router_fit import fit_new_expert_routing, moe_layer_inputs, new_expert_loss
from nexus.upcycling import extend, upcycle

pytestmark = pytest.mark.usefixtures("one_thread")  # many small matmuls: a second thread only adds contention


def _appended(router: str) -> Transformer:
    torch.manual_seed(0)
    config = tiny(max_seq_len=16)
    seed, experts = Transformer(config), [Transformer(config) for _ in range(3)]
    moe = upcycle(seed, experts, domain_embeddings=torch.randn(3, 8), router=router)
    return extend(moe, Transformer(config), domain_embedding=torch.randn(8), name="new")


def _windows(low: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(low, high, (24, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_fit_routes_the_new_domain_to_the_new_expert_and_keeps_the_old_entries(router):
    model = _appended(router)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_matrix = [b.ffn.router(model.domain_embeddings).detach()[:3] for b in model.blocks]
    fit = fit_new_expert_routing(model, 3, _windows(48, 96, 1), _windows(0, 48, 2), steps=100)
    for new_before, new_after, old_after in zip(fit.new_before, fit.new_after, fit.old_after):
        assert new_after >= 0.8 and new_after > new_before + 0.3 and old_after < new_after / 2, fit
    held_out = fit_new_expert_routing(model, 3, _windows(48, 96, 3), _windows(0, 48, 4), steps=0)
    assert min(held_out.new_before) >= 0.7  # generalises to windows it was not fitted on
    for key, tensor in model.state_dict().items():
        if ".router." not in key:
            assert torch.equal(tensor, before[key]), key  # only the router moves
    for block, old in zip(model.blocks, old_matrix):
        now = block.ffn.router(model.domain_embeddings).detach()
        if router == "linear":
            assert torch.equal(now[:3], old)  # trained rows untouched
        else:
            torch.testing.assert_close(now[:3], old, rtol=1e-4, atol=1e-6)  # earlier expert embeddings held


def test_layer_inputs_and_loss():
    model = _appended("linear")
    inputs = moe_layer_inputs(model, _windows(0, 96, 5), batch_size=5)
    assert len(inputs) == 2 and inputs[0].shape == (24 * 16, 32)
    logits = torch.tensor([[0.0, 10.0]])
    assert new_expert_loss(logits, -logits, 1) < 1e-3  # new tokens on the new expert, old ones elsewhere
    assert new_expert_loss(-logits, logits, 1) > 10


def test_a_new_domain_embedding_equal_to_an_earlier_one_leaves_the_projection_unedited():
    model = _appended("nexus")
    with torch.no_grad():
        model.domain_embeddings[3] = model.domain_embeddings[1]  # nothing can separate expert 3 from expert 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_new_expert_routing(model, 3, _windows(48, 96, 1), _windows(0, 48, 2), steps=5)
    assert fit.edited == [False, False]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
