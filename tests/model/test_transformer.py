"""The decoder: causality, block variants, GQA, tied embeddings, and that it learns."""
import pytest
import torch

from nexus.config import tiny
from nexus.model.transformer import Transformer, causal_lm_loss
from nexus.upcycling import upcycle


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_causal_shapes_and_no_future_leak(parallel, kv_heads):
    model = Transformer(tiny(parallel_blocks=parallel, n_kv_heads=kv_heads)).eval()
    idx = torch.randint(0, 96, (2, 20))
    logits = model(idx).logits
    assert logits.shape == (2, 20, 96)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 96
    torch.testing.assert_close(model(changed).logits[:, :12], logits[:, :12])
    assert not torch.allclose(model(changed).logits[:, 12:], logits[:, 12:])


def test_parallel_and_sequential_blocks_differ():
    a = Transformer(tiny(parallel_blocks=True))
    assert all(b.ffn_norm is None for b in a.blocks)
    b = Transformer(tiny(parallel_blocks=False))
    assert all(b.ffn_norm is not None for b in b.blocks)


def test_no_biases_anywhere():
    model = Transformer(tiny().with_moe(expert_names=["a", "b"], domain_embed_dim=8))
    assert not [n for n, _ in model.named_parameters() if "bias" in n]


def test_tied_embeddings_share_storage():
    model = Transformer(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


def _fit(model, steps=40, lr=3e-3):
    torch.manual_seed(1)
    batch = torch.randint(0, 96, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(batch[:, :-1])
        loss = causal_lm_loss(out.logits, batch[:, 1:])
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_dense_model_learns_a_fixed_batch():
    losses = _fit(Transformer(tiny()))
    assert losses[-1] < 0.6 * losses[0]


def test_upcycled_nexus_moe_learns_a_fixed_batch():
    seed = Transformer(tiny())
    experts = [Transformer(tiny()) for _ in range(3)]
    moe = upcycle(seed, experts, domain_embeddings=torch.randn(3, 16), router="nexus")
    losses = _fit(moe)
    assert losses[-1] < 0.6 * losses[0]


def test_generate_appends_tokens():
    model = Transformer(tiny()).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=5)
    assert out.shape == (1, 8)
