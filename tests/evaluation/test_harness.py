"""lm-eval on model directories: lm-eval's own `hf` class on a `nexus export` scores exactly what the
`nexus` class scores on the checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.errors import ConfigError
from nexus.evaluation.harness import lm_eval_rows, model_spec, run_lm_eval, task_manager
from nexus.evaluation.tasks import write_task_suite
from nexus.interop import export_checkpoint
from nexus.upcycling import upcycle

METRICS = ("byte_perplexity,none", "bits_per_byte,none", "word_perplexity,none")
pytestmark = pytest.mark.usefixtures("one_thread")  # many small forward passes


@pytest.fixture(scope="module")
def suite(tmp_path_factory, domain_texts):
    return write_task_suite(domain_texts, tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def nexus_moe(tmp_path_factory, trained_checkpoint):
    """A parallel-block Nexus MoE (top-2) upcycled from the trained model and two perturbed copies."""
    seed = load_checkpoint(trained_checkpoint)
    experts = []
    for i in range(2):
        expert = load_checkpoint(trained_checkpoint)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        experts.append(expert)
    moe = upcycle(
        seed,
        experts,
        domain_embeddings=torch.randn(2, 8, generator=torch.Generator().manual_seed(5)),
        top_k=2,
    )
    return save_checkpoint(
        moe,
        tmp_path_factory.mktemp("moe") / "ckpt",
        extra_files={"tokenizer.json": trained_checkpoint / "tokenizer.json"},
    )


@pytest.mark.parametrize("which", [pytest.param("dense", marks=pytest.mark.slow), "nexus-moe"])
def test_hf_on_the_export_equals_nexus_on_the_checkpoint(
    tmp_path, which, trained_checkpoint, nexus_moe, suite
):
    checkpoint = trained_checkpoint if which == "dense" else nexus_moe
    export = export_checkpoint(checkpoint, tmp_path / "hf")
    assert model_spec(checkpoint)[0] == "nexus"
    assert model_spec(export) == ("hf", {"pretrained": str(export), "trust_remote_code": True})
    ours = run_lm_eval(checkpoint, [suite.group], [suite.include_path], batch_size=4)
    theirs = run_lm_eval(export, [suite.group], [suite.include_path], batch_size=4)
    for task in suite.names:
        for metric in METRICS:
            a, b = ours["results"][task][metric], theirs["results"][task][metric]
            assert abs(a - b) <= 1e-6 * a, (task, metric, a, b)


def test_lm_eval_rows_keep_metrics_and_drop_stderr_and_aliases():
    results = {
        "results": {
            "arc": {
                "alias": "arc",
                "acc,none": 0.5,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.6,
                "exact_match,strict-match": 0.25,
            }
        }
    }
    assert lm_eval_rows(results) == [
        ("arc", "acc", 0.5),
        ("arc", "acc_norm", 0.6),
        ("arc", "exact_match_strict-match", 0.25),
    ]
    assert lm_eval_rows({}) == []


def test_include_path_tasks_need_no_index_of_lm_evals_own(suite):
    manager = task_manager([suite.group, suite.names[0]], [suite.include_path])
    assert sorted(manager.all_tasks) == sorted([suite.group, *suite.names])
    with pytest.raises(ConfigError, match="no lm-eval tasks"):
        run_lm_eval(suite.include_path, [])


def test_not_a_model_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="neither a Nexus checkpoint nor a transformers model"):
        model_spec(tmp_path)


@pytest.mark.slow
def test_the_lm_eval_cli_on_the_export_gives_nexus_eval_s_byte_perplexity(tmp_path, nexus_moe, suite):
    """`lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True` in its own process."""
    import json

    export = export_checkpoint(nexus_moe, tmp_path / "hf")
    task = suite.names[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [
            str(Path(sys.executable).parent / "lm_eval"),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={export},trust_remote_code=True",
            "--tasks",
            task,
            "--include_path",
            str(suite.include_path),
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "out"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    (result,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(result.read_text())["results"][task]["byte_perplexity,none"]
    ours = run_lm_eval(nexus_moe, [task], [suite.include_path])["results"][task]["byte_perplexity,none"]
    assert abs(theirs - ours) <= 1e-6 * ours
