"""The remote-code NexusForCausalLM beyond parity with the Nexus model: padded batches, the cache,
the training loss."""

from __future__ import annotations

import pytest
import torch

from nexus.interop import export_hf
from nexus.model.transformer import causal_lm_loss
from tests.interop import nexus_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(
    scope="module",
    params=[{}, {"attention_experts": "full", "attention_shared_expert": True}],
    ids=["moe", "bam-full"],
)
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    moe = nexus_model(True, {"router": "nexus", "top_k": 2, **request.param})
    out = export_hf(moe, tmp_path_factory.mktemp("hf") / "moe")
    return moe, AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def test_left_padded_batch_generates_what_each_prompt_generates_alone(pair):
    _, hf = pair
    prompts = [tokens(1, n, seed=n)[0] for n in (5, 9, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    batch = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
    )
    for row, prompt in zip(batch, prompts):
        alone = hf.generate(prompt[None], max_new_tokens=10, do_sample=False)[0]
        assert torch.equal(row[width:], alone[len(prompt) :])


def test_cached_chunks_give_the_full_forward(pair):
    from transformers import DynamicCache

    _, hf = pair
    idx = tokens(length=20)
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        full = hf(idx).logits
        chunks = [hf(idx[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 7), (7, 8), (8, 20))]
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_labels_give_the_causal_lm_loss(pair):
    moe, hf = pair
    idx = tokens(length=16)
    with torch.no_grad():
        loss = hf(idx, labels=idx).loss
        ours = causal_lm_loss(moe(idx[:, :-1]).logits, idx[:, 1:])
    torch.testing.assert_close(loss, ours, rtol=1e-5, atol=1e-6)
