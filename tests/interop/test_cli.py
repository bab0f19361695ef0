"""`nexus import` / `nexus export` round trips through the real console entry point."""

from __future__ import annotations

import filecmp
import json

import torch

from flows.cli import main
from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.interop import tokenizer_files
from nexus.upcycling import upcycle
from tests.interop import make_llama, max_diff, nexus_model, perturbed, save_tokenizer, tokens


def test_import_export_round_trip(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    original = make_llama(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "seed")]) == 0
    assert main(["export", str(tmp_path / "seed"), str(tmp_path / "out")]) == 0
    assert "as LlamaForCausalLM, with tokenizer" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.eos_token_id == 2
    idx = tokens()
    with torch.no_grad():
        assert max_diff(exported(idx).logits, original(idx).logits) < 1e-5

    # an MoE upcycled from the imported seed exports as Qwen2-MoE, its tokenizer carried along
    seed = load_checkpoint(tmp_path / "seed")
    moe = upcycle(seed, [perturbed(seed, seed=1), perturbed(seed, seed=2)], router="linear", top_k=1)
    save_checkpoint(moe, tmp_path / "moe", extra_files=tokenizer_files(tmp_path / "seed"))
    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "moe_hf")]) == 0
    assert "as Qwen2MoeForCausalLM, with tokenizer" in capsys.readouterr().out
    hf_moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe_hf").eval()
    with torch.no_grad():
        assert max_diff(hf_moe(idx).logits, moe.eval()(idx).logits) < 1e-5


def test_paper_moe_exports_with_remote_code_and_imports_back(tmp_path, monkeypatch, capsys):
    """A parallel-block Nexus MoE (the default of every shipped config), exported twice into the same
    directory from a fresh working directory, loads in transformers and imports back bit for bit."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    save_tokenizer(tmp_path / "tok")
    moe = nexus_model(True, {"router": "nexus", "top_k": 1})
    save_checkpoint(moe, "moe", extra_files=tokenizer_files(tmp_path / "tok"))
    (tmp_path / "eval.json").write_text(json.dumps({"results": {"hellaswag": {"acc,none": 0.25}}}))
    for _ in range(2):
        assert main(["export", "moe", "hf", "--results", "eval.json"]) == 0
        assert (
            "as NexusForCausalLM (remote code: load with trust_remote_code=True)" in capsys.readouterr().out
        )
    assert "| hellaswag | acc | 0.25 |" in (tmp_path / "hf" / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    idx = tokens()
    with torch.no_grad():
        assert max_diff(hf(idx).logits, moe(idx).logits) < 1e-5
    assert main(["import", "hf", "back"]) == 0
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert filecmp.cmpfiles("moe", "back", files, shallow=False)[0] == files


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), str(tmp_path / "ckpt")]) == 2
    assert "config.json: file not found" in capsys.readouterr().err

    make_llama(tmp_path / "seed_hf")
    make_llama(tmp_path / "wide_hf", intermediate_size=96)
    assert main(["import", str(tmp_path / "seed_hf"), str(tmp_path / "seed")]) == 0
    like = ["--like", str(tmp_path / "seed")]
    assert main(["import", str(tmp_path / "wide_hf"), str(tmp_path / "expert"), *like]) == 2
    assert "ffn_hidden=96 (expected 64)" in capsys.readouterr().err
    assert not (tmp_path / "expert").exists()

    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
