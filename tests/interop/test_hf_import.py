"""Import of transformers Llama directories: logits parity, tokenizer files, refusals, family checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from nexus.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.errors import CheckpointError, IncompatibleModelsError
from nexus.interop import UnsupportedModelError, check_same_family, import_hf, load_hf_model
from tests.interop import make_llama, max_diff, perturbed, tokens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_llama(directory)
    return directory


@pytest.mark.parametrize("kv_heads, tied", [(2, True), (4, False)], ids=["gqa-tied", "mha-untied"])
def test_imported_logits_equal_transformers(tmp_path, kv_heads, tied):
    hf = make_llama(tmp_path / "hf", num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = load_checkpoint(out).eval()

    cfg = model.config
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (kv_heads, tied, 1000.0)
    assert not cfg.parallel_blocks
    assert (cfg.n_kv_heads is None) == (kv_heads == 4)  # MHA normalised to the Nexus default
    idx = tokens()
    with torch.no_grad():
        diff = max_diff(model(idx).logits, hf(idx).logits)
    assert diff < 1e-5, diff
    # the tokenizer travels with the checkpoint, byte for byte; special tokens go into the metadata
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    meta = read_checkpoint_config(out)["metadata"]["hf"]
    assert (meta["architecture"], meta["bos_token_id"], meta["eos_token_id"]) == ("LlamaForCausalLM", 1, 2)


def test_import_dtype_and_sharded_weights(tmp_path, llama_dir):
    """A sharded safetensors directory imports like a single file; `dtype` converts."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_hf_model(llama_dir), load_hf_model(tmp_path / "sharded", dtype=torch.bfloat16)
    assert b.tok_emb.weight.dtype == torch.bfloat16
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x.to(torch.bfloat16), y), name


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _drop_config(d):
    (d / "config.json").unlink()


def _bin_only(d):
    torch.save({}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _extra_bias(d):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


BAD_INPUTS = {
    "missing-config": (_drop_config, CheckpointError, ["config.json", "not found"]),
    "mistral": (lambda d: _edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"]),
                UnsupportedModelError, ["config.json", "MistralForCausalLM", "LlamaForCausalLM"]),
    "attention-bias": (lambda d: _edit_config(d, attention_bias=True), UnsupportedModelError,
                       ["config.json", "attention_bias"]),
    "mlp-bias": (lambda d: _edit_config(d, mlp_bias=True), UnsupportedModelError, ["mlp_bias"]),
    "gelu": (lambda d: _edit_config(d, hidden_act="gelu"), UnsupportedModelError, ["hidden_act"]),
    "rope-llama3": (lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0}),
                    UnsupportedModelError, ["rope_parameters.rope_type='llama3'"]),
    "rope-scaling-linear": (lambda d: _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}),
                        UnsupportedModelError, ["rope_scaling", "linear"]),
    "head-dim": (lambda d: _edit_config(d, head_dim=16), UnsupportedModelError, ["head_dim=16"]),
    "bin-only": (_bin_only, CheckpointError, ["pytorch_model.bin", "safetensors"]),
    "unexpected-tensor": (_extra_bias, CheckpointError, ["unexpected tensors", "q_proj.bias"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_by_name(tmp_path, llama_dir, case):
    mutate, error, words = BAD_INPUTS[case]
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    mutate(bad)
    with pytest.raises(error) as info:
        import_hf(bad, tmp_path / "ckpt")
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "ckpt").exists()


def test_family_check_names_architecture_and_tokenizer(tmp_path, llama_dir):
    seed = import_hf(llama_dir, tmp_path / "seed")
    model = load_checkpoint(seed)
    expert = save_checkpoint(perturbed(model), tmp_path / "expert", extra_files={
        "tokenizer.json": seed / "tokenizer.json", "tokenizer_config.json": seed / "tokenizer_config.json"})
    check_same_family(seed, expert)  # same architecture, same tokenizer: fine
    check_same_family(seed, llama_dir)  # a transformers directory is accepted too

    wide = tmp_path / "wide"
    make_llama(wide, intermediate_size=96)
    with pytest.raises(IncompatibleModelsError, match="ffn_hidden=96"):
        check_same_family(seed, wide)
    with pytest.raises(IncompatibleModelsError, match="ffn_hidden=96"):
        import_hf(wide, tmp_path / "refused", like=seed)
    assert not (tmp_path / "refused").exists()

    (expert / "tokenizer.json").write_text((expert / "tokenizer.json").read_text().replace('"w95"', '"zz"'))
    with pytest.raises(IncompatibleModelsError, match="tokenizer.json differs"):
        check_same_family(seed, expert)
    (expert / "tokenizer_config.json").unlink()
    with pytest.raises(IncompatibleModelsError, match="tokenizer_config.json missing"):
        check_same_family(seed, expert)
