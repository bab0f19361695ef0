"""The `nexus` lm-eval model class through the real harness, offline."""

import math
import re
import runpy
import sys

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance

from nexus.config import tiny
from nexus.evaluation.lm_eval_adapter import NexusLM
from nexus.evaluation.perplexity import text_perplexity
from nexus.evaluation.tasks import write_task_suite
from nexus.model.transformer import Transformer


def test_simple_evaluate_perplexity_equals_ours(
    tmp_path, trained_checkpoint, trained_model, tokenizer, domain_texts
):
    suite = write_task_suite(domain_texts, tmp_path / "tasks")
    out = simple_evaluate(
        model="nexus",
        model_args={"path": str(trained_checkpoint), "batch_size": 4},
        tasks=[suite.group],
        task_manager=suite.task_manager(),
        bootstrap_iters=0,
        log_samples=False,
    )
    for domain, texts in domain_texts.items():
        assert (
            max(len(tokenizer.encode(t)) for t in texts) > trained_model.config.max_seq_len
        )  # rolling windows used
        reported = out["results"][f"nexus_heldout_{domain}"]
        ours = text_perplexity(trained_model, tokenizer, texts)
        assert reported["byte_perplexity,none"] == pytest.approx(ours.byte_perplexity, rel=1e-5)
        assert reported["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-5)
        words = sum(len(re.split(r"\s+", t)) for t in texts)  # lm-eval's word count
        assert reported["word_perplexity,none"] == pytest.approx(math.exp(ours.nll / words), rel=1e-5)


def _requests(kind, args_list):
    return [Instance(kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_loglikelihood_scores_the_continuation(trained_checkpoint, trained_model, tokenizer):
    lm = NexusLM(path=str(trained_checkpoint))
    context, continuation = "def f(x):", "\n    return x + 1\n"
    (logprob, greedy), (empty_lp, _) = lm.loglikelihood(
        _requests("loglikelihood", [(context, continuation), ("", continuation)])
    )
    ids = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    logits = trained_model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    expected = logits[torch.arange(n_ctx - 1, len(ids) - 1), torch.tensor(ids[n_ctx:])].sum().item()
    assert logprob == pytest.approx(expected, rel=1e-5)
    assert greedy == bool((logits[n_ctx - 1 :].argmax(-1) == torch.tensor(ids[n_ctx:])).all())
    assert empty_lp < logprob  # without the context the continuation is less likely


@pytest.fixture(scope="module")
def echo_lm(tokenizer, fit):
    """A model overfitted on one repeated sentence, so greedy generation is predictable."""
    ids = torch.tensor(tokenizer.encode("the expert routes tokens. " * 12)[:65])
    torch.manual_seed(0)
    model = fit(Transformer(tiny(vocab_size=len(tokenizer))), lambda: ids[None], steps=30, lr=1e-2)
    return NexusLM(model=model, tokenizer=tokenizer, max_gen_toks=24)


def test_generate_until_generates_and_honours_stop_sequences(echo_lm):
    prompt = "the expert routes tokens. the expert"
    free, stopped, other = echo_lm.generate_until(
        _requests(
            "generate_until",
            [
                (prompt, {"until": [], "max_gen_toks": 12}),
                (prompt, {"until": ["tokens"], "max_gen_toks": 12}),
                ("the expert routes tokens. the model", {"until": ["\n\n"], "max_gen_toks": 4}),
            ],
        )
    )
    assert free.startswith(" routes tokens. the")  # continues the memorised sentence
    assert stopped == " routes "  # cut before the first stop string
    assert other and len(echo_lm.tok_encode(other)) <= 4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module is already imported
def test_cli_entry_point_runs_lm_eval(tmp_path, monkeypatch, capsys, trained_checkpoint, domain_texts):
    """`python -m nexus.evaluation.lm_eval_adapter run ...`, run in-process (a subprocess would
    re-import torch and lm-eval); the CLI indexes lm-eval's default tasks, ~10 s of this test."""
    suite = write_task_suite({"code": domain_texts["code"][:2]}, tmp_path / "tasks")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lm_eval_adapter",
            "run",
            "--model",
            "nexus",
            "--model_args",
            f"path={trained_checkpoint}",
            "--batch_size",
            "2",
            "--tasks",
            "nexus_heldout_code",
            "--include_path",
            str(suite.include_path),
            "--output_path",
            str(tmp_path / "out"),
        ],
    )
    runpy.run_module("nexus.evaluation.lm_eval_adapter", run_name="__main__")
    out = capsys.readouterr().out
    assert "nexus_heldout_code" in out and "bits_per_byte" in out
    assert list((tmp_path / "out").rglob("results_*.json"))
