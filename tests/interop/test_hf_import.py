"""Import: Llama / Mistral / Qwen2 directories with logits equal to transformers', every `nexus export`
back bit for bit, refusals naming the file and key, family checks."""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest
import torch

from nexus.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.errors import CheckpointError, IncompatibleModelsError
from nexus.interop import (
    UnsupportedModelError,
    check_same_family,
    export_checkpoint,
    export_hf,
    import_hf,
    load_hf_model,
)
from tests.interop import (
    VARIANTS,
    make_family,
    make_llama,
    nexus_model,
    perturbed,
    rel_err,
    save_tokenizer,
    tokens,
    variant_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_llama(directory)
    return directory


FAMILIES = {  # name: (family, config overrides)
    "llama-gqa-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "mistral": ("mistral", {}),
    "qwen2-gqa": ("qwen2", {}),
    "qwen2-mha-tied": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_imported_logits_equal_transformers(tmp_path, name):
    family, overrides = FAMILIES[name]
    make = make_llama if family == "llama" else lambda d, **kw: make_family(d, family, **kw)
    hf = make(tmp_path / "hf", **overrides)
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = load_checkpoint(out).eval()

    cfg, kv_heads = model.config, overrides.get("num_key_value_heads", 2)
    tied = overrides.get("tie_word_embeddings", False)
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (kv_heads, tied, 1000.0)
    assert cfg.qkv_bias == (family == "qwen2") and not cfg.parallel_blocks
    assert (cfg.n_kv_heads is None) == (kv_heads == 4)  # MHA normalised to the Nexus default
    idx = tokens()
    with torch.no_grad():
        err = rel_err(hf(idx).logits, model(idx).logits)
    assert err < 1e-5, err
    # the tokenizer travels with the checkpoint, byte for byte; special tokens go into the metadata
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / file).read_bytes() == (tmp_path / "hf" / file).read_bytes()
    meta = read_checkpoint_config(out)["metadata"]["hf"]
    assert (meta["architecture"], meta["bos_token_id"], meta["eos_token_id"]) == (type(hf).__name__, 1, 2)


def test_sliding_window_shorter_than_the_context_becomes_the_context(tmp_path):
    """Within its window a Mistral attends to every earlier token: the window is the exact context."""
    hf = make_family(tmp_path / "hf", "mistral", sliding_window=16)
    model = load_hf_model(tmp_path / "hf")
    assert model.config.max_seq_len == 16
    longer = tokens(length=24)  # beyond its window transformers slides it; Nexus refuses
    with torch.no_grad():
        assert rel_err(hf(longer).logits[:, :16], model(longer[:, :16]).logits) < 1e-5
        with pytest.raises(ValueError, match="max_seq_len=16"):
            model(longer)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_then_import_restores_the_checkpoint_bit_for_bit(tmp_path, name):
    """Tensors, config.json (model config, metadata, weights SHA-256) and tokenizer files: identical."""
    model, remote, _ = variant_model(name)
    save_tokenizer(tmp_path / "tok")
    meta = {"experiment": "micro", "domains": ["a", "b", "c"], "metrics": {"val_loss": 1.5}}
    ckpt = save_checkpoint(
        model,
        tmp_path / "ckpt",
        metadata=meta,
        extra_files={"tokenizer.json": tmp_path / "tok" / "tokenizer.json"},
    )
    out = export_checkpoint(ckpt, tmp_path / "hf", remote_code=remote)
    back = import_hf(out, tmp_path / "back")
    files = sorted(p.name for p in ckpt.iterdir())
    assert (
        sorted(p.name for p in back.iterdir())
        == files
        == ["config.json", "model.safetensors", "tokenizer.json"]
    )
    assert filecmp.cmpfiles(ckpt, back, files, shallow=False)[0] == files
    restored = load_checkpoint(back)
    assert restored.config == model.config
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_a_nexus_router_export_imports_extensible(tmp_path):
    """The Nexus router's projection and domain embeddings survive export and import (Qwen2-MoE keeps
    them beside its weights), so the imported MoE takes a new expert."""
    from nexus.upcycling import extend

    moe = nexus_model(False, {"router": "nexus", "top_k": 1})
    out = export_hf(moe, tmp_path / "hf")
    assert (out / "nexus_router.safetensors").is_file()
    back = load_hf_model(out)
    extended = extend(
        back, perturbed(nexus_model(False), seed=9), domain_embedding=torch.randn(16), name="new"
    )
    assert extended.config.moe.expert_names == ["expert_0", "expert_1", "expert_2", "new"]
    assert torch.equal(extended.domain_embeddings[:3], moe.domain_embeddings)


def test_an_edited_qwen2_moe_router_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    out = export_hf(nexus_model(False, {"router": "nexus", "top_k": 1}), tmp_path / "hf")
    state = load_file(out / "model.safetensors")
    state["model.layers.1.mlp.gate.weight"] += 0.01  # e.g. finetuned in transformers
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.gate.weight differs .* P_r\(D\)"):
        import_hf(out, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


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
    "gemma": (
        lambda d: _edit_config(d, model_type="gemma", architectures=["GemmaForCausalLM"]),
        UnsupportedModelError,
        ["config.json", "GemmaForCausalLM", "Qwen2ForCausalLM", "nexus export"],
    ),
    "mixed-family": (
        lambda d: _edit_config(d, model_type="mistral"),
        UnsupportedModelError,
        ["architectures=['LlamaForCausalLM']", "model_type='mistral'"],
    ),
    "bad-nexus-record": (
        lambda d: _edit_config(d, nexus={"format": "other"}),
        CheckpointError,
        ["config.json", "'nexus' is not a nexus-export record"],
    ),
    "attention-bias": (
        lambda d: _edit_config(d, attention_bias=True),
        UnsupportedModelError,
        ["config.json", "attention_bias"],
    ),
    "mlp-bias": (lambda d: _edit_config(d, mlp_bias=True), UnsupportedModelError, ["mlp_bias"]),
    "gelu": (lambda d: _edit_config(d, hidden_act="gelu"), UnsupportedModelError, ["hidden_act"]),
    "rope-llama3": (
        lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0}),
        UnsupportedModelError,
        ["rope_parameters.rope_type='llama3'"],
    ),
    "rope-scaling-linear": (
        lambda d: _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}),
        UnsupportedModelError,
        ["rope_scaling", "linear"],
    ),
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
    expert = save_checkpoint(
        perturbed(model),
        tmp_path / "expert",
        extra_files={
            "tokenizer.json": seed / "tokenizer.json",
            "tokenizer_config.json": seed / "tokenizer_config.json",
        },
    )
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
