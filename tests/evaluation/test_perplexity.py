"""Perplexity: windowing matches lm-eval's reference, batching/padding changes nothing, and the
results equal a naive one-forward-per-sequence computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nexus.config import tiny
from nexus.evaluation.perplexity import (
    Perplexity,
    document_windows,
    domain_perplexities,
    evaluate_checkpoints,
    score_windows,
    split_perplexity,
    stream_bytes,
    stream_windows,
    text_perplexity,
)
from nexus.model.transformer import Transformer


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 30])
def test_document_windows_match_lm_eval_reference(n):
    tokens = list(range(10, 10 + n))
    ours = document_windows(tokens, prefix_id=0, max_len=8)
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, 8, 1)]
    assert len(ours) == len(ref)
    for w, (context, cont) in zip(ours, ref):
        whole = context + cont  # lm-eval feeds (context + continuation)[:-1], scores the last len(cont)
        assert list(w.input_ids) == whole[:-1] and list(w.targets) == whole[1:] and w.n_scored == len(cont)
    assert sum(w.n_scored for w in ours) == n  # every token predicted exactly once


def test_stream_windows_predict_every_token_but_the_first_once():
    windows = stream_windows(np.arange(21), seq_len=8)
    assert [len(w.input_ids) for w in windows] == [8, 8, 4]
    assert np.concatenate([w.targets for w in windows]).tolist() == list(range(1, 21))


def _naive_nll(model, ids):
    """Sum of -log p over ids[1:] in one forward pass."""
    logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


def test_text_perplexity_equals_naive_for_short_documents(trained_model, tokenizer, domain_texts):
    texts = [t for texts in domain_texts.values() for t in texts if len(tokenizer.encode(t)) < 64]
    assert len(texts) >= 4
    ours = text_perplexity(trained_model, tokenizer, texts, batch_size=4)
    nll = sum(_naive_nll(trained_model, [tokenizer.eos_token_id, *tokenizer.encode(t)]) for t in texts)
    assert ours.tokens == sum(len(tokenizer.encode(t)) for t in texts)
    assert ours.bytes == sum(len(t.encode()) for t in texts)
    assert ours.nll == pytest.approx(nll, rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(nll / ours.bytes / math.log(2), rel=1e-5)


def test_split_perplexity_equals_naive_and_counts_bytes(trained_model, tokenizer, domain_texts):
    ids = []
    for text in domain_texts["code"]:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    result = split_perplexity(trained_model, np.array(ids), tokenizer, seq_len=32, batch_size=3)
    naive = sum(_naive_nll(trained_model, ids[s : s + 33]) for s in range(0, len(ids) - 1, 32))
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(naive, rel=1e-5)
    # the predicted tokens (all but the first) decode to the documents minus their first byte
    expected_bytes = len("".join(domain_texts["code"]).encode()) - 1 + len(domain_texts["code"])
    assert stream_bytes(ids, tokenizer) == result.bytes == expected_bytes
    trained_ppl = result.perplexity
    untrained = split_perplexity(Transformer(trained_model.config), np.array(ids), tokenizer, seq_len=32)
    assert trained_ppl < 0.7 * untrained.perplexity  # training did something, and we can see it


def test_moe_batched_scores_equal_unbatched():
    """Right-padding must not change real tokens' outputs, MoE routing included."""
    model = Transformer(tiny(moe={"expert_names": ["a", "b", "c"], "router": "linear"})).eval()
    rng = np.random.default_rng(0)
    windows = [w for n in (5, 40) for w in document_windows(rng.integers(2, 96, n).tolist(), 0, 16)]
    batched = score_windows(model, windows, batch_size=4)
    single = score_windows(model, windows, batch_size=1)
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in single], rel=1e-5)


def test_perplexity_properties_and_checkpoint_evaluation(trained_checkpoint, tokenizer):
    p = Perplexity(nll=2 * math.log(2) * 10, tokens=10, bytes=20)
    assert p.perplexity == pytest.approx(4.0) and p.bits_per_byte == pytest.approx(1.0)
    assert math.isnan(Perplexity(1.0, 1).bits_per_byte)
    splits = {"d": np.array(tokenizer.encode("def f(x):\n    return x + 1\n") + [tokenizer.eos_token_id])}
    results = evaluate_checkpoints({"dense": trained_checkpoint}, splits)  # tokenizer from the checkpoint
    from nexus.checkpoint import load_checkpoint

    direct = domain_perplexities(load_checkpoint(trained_checkpoint), splits, tokenizer)
    assert results["dense"]["d"] == direct["d"] and results["dense"]["d"].bytes > 0
