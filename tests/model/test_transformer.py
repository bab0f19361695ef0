"""The decoder: causality, block variants, GQA, q/k/v biases, tied embeddings, the KV cache, and that it learns."""

import pytest
import torch

from nexus.config import tiny
from nexus.model.transformer import KVCache, Transformer, causal_lm_loss
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


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_kv_cache_chunks_give_the_full_forward(parallel, moe):
    """Prefill, then one token, then a chunk: each position's logits as in one uncached forward; the
    prefill itself is the uncached computation exactly."""
    config = tiny(parallel_blocks=parallel, n_kv_heads=2, qkv_bias=True)
    model = Transformer(
        config.with_moe(expert_names=["a", "b", "c"], top_k=2, domain_embed_dim=8) if moe else config
    )
    if moe:
        model.domain_embeddings.normal_()
    model.eval()
    idx = torch.randint(0, 96, (2, 20))
    cache = KVCache(model.config, batch_size=2)
    with torch.no_grad():
        full = model(idx).logits
        chunks = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 20))]
        assert torch.equal(chunks[0], model(idx[:, :7]).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):
        model(torch.zeros(2, 45, dtype=torch.long), cache=cache)


def test_qkv_biases_are_zero_initialised_and_used():
    model = Transformer(tiny(qkv_bias=True)).eval()
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == 3 * 2 and all(n.split(".")[-2] in ("wq", "wk", "wv") for n in biases)
    idx = torch.randint(0, 96, (1, 10))
    before = model(idx).logits
    with torch.no_grad():
        model.blocks[0].attn.wv.bias.fill_(0.5)
    assert not torch.allclose(model(idx).logits, before)
