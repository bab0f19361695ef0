"""Export to transformers: upcycled MoEs as Qwen2-MoE and dense models as Llama, logits-exact."""
from __future__ import annotations

import pytest
import torch

from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import tiny
from nexus.interop import (
    UnsupportedModelError,
    export_checkpoint,
    export_hf,
    hf_config,
    import_hf,
    load_hf_model,
    tokenizer_files,
)
from nexus.model.transformer import Transformer
from nexus.upcycling import merge_dense, upcycle
from tests.interop import make_llama, max_diff, perturbed, tokens

N_EXPERTS = 3


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    """An imported tiny Llama (GQA, tied embeddings): a Nexus checkpoint with tokenizer files."""
    hf = tmp_path_factory.mktemp("hf")
    make_llama(hf, tie_word_embeddings=True)
    return import_hf(hf, tmp_path_factory.mktemp("seed") / "ckpt")


@pytest.fixture(scope="module")
def family(seed_dir):
    seed = load_checkpoint(seed_dir).eval()
    return seed, [perturbed(seed, seed=i + 1) for i in range(N_EXPERTS)]


def _load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


ROUTER_STD = {"nexus": 0.15, "linear": 0.3}
"""Router weight scales giving clear top-k choices yet unsaturated gates (mean top-1 prob ~0.5-0.75)."""


def _upcycled(family, router: str, **moe) -> Transformer:
    """An upcycled MoE with random router weights, the Nexus router precomputed."""
    seed, experts = family
    domains = torch.randn(N_EXPERTS, 16, generator=torch.Generator().manual_seed(0))
    domains = domains if router == "nexus" else None
    model = upcycle(seed, experts, domain_embeddings=domains, router=router, **moe)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * ROUTER_STD[router])
    model.eval()
    model.precompute_routers()
    return model


MOE_CASES = {
    "nexus-top1": {"router": "nexus", "top_k": 1},
    "nexus-top2": {"router": "nexus", "top_k": 2},
    "linear-top1": {"router": "linear", "top_k": 1},
    "linear-top2": {"router": "linear", "top_k": 2},
    "nexus-top2-normalized": {"router": "nexus", "top_k": 2, "normalize_gates": True},
    "linear-top1-no-shared": {"router": "linear", "top_k": 1, "shared_expert": False},
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_exported_moe_logits_equal(tmp_path, family, seed_dir, case):
    moe = _upcycled(family, **MOE_CASES[case])
    out = export_hf(moe, tmp_path / "hf", tokenizer_dir=seed_dir)
    hf = _load_hf(out)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert hf.config.num_experts_per_tok == moe.config.moe.top_k
    idx = tokens()
    with torch.no_grad():
        ours = moe(idx)
        diff = max_diff(ours.logits, hf(idx).logits)
    assert diff < 1e-5, diff
    for info in ours.routing:  # every expert gets tokens, and the gate values matter (not 0/1)
        assert (torch.bincount(info.expert_index.flatten(), minlength=N_EXPERTS) > 0).all()
        assert 0.45 < info.probs.max(-1).values.mean() < 0.9


def test_generate_through_transformers(tmp_path, family, seed_dir):
    from transformers import AutoTokenizer

    moe = _upcycled(family, router="nexus", top_k=1)
    out = export_checkpoint(save_checkpoint(moe, tmp_path / "moe", extra_files=tokenizer_files(seed_dir)),
                            tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    hf = _load_hf(out)
    prompt = tok("w3 w17 w42 w5", return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt.input_ids.shape[1] + 6)
    assert torch.equal(generated, moe.generate(prompt.input_ids, max_new_tokens=6))  # same greedy tokens
    # no hf metadata in an upcycled checkpoint: the ids come from its tokenizer files
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_dense_exports_as_llama_and_round_trips(tmp_path, family):
    seed, experts = family
    merged = merge_dense(seed, experts)
    out = export_hf(merged, tmp_path / "hf")
    hf = _load_hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = tokens()
    with torch.no_grad():
        diff = max_diff(merged(idx).logits, hf(idx).logits)
    assert diff < 1e-5, diff
    back = load_hf_model(out)  # export then import is the identity, tensor for tensor
    assert back.config == merged.config
    for (name, a), b in zip(merged.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_shared_expert_scaling_is_exact_in_bf16(tmp_path, family):
    """The doubled down_proj times sigmoid(0) = 0.5 is bit-exact, not just close: bf16 would show it."""
    moe = _upcycled(family, router="linear", top_k=1).to(torch.bfloat16)
    hf = _load_hf(export_hf(moe, tmp_path / "hf"))
    assert hf.dtype == torch.bfloat16
    shared = moe.blocks[0].ffn.shared
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mlp = hf.model.layers[0].mlp
    with torch.no_grad():
        theirs = torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
        assert torch.equal(theirs, shared(x))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_parallel_blocks_are_refused(tmp_path, moe):
    config = tiny(parallel_blocks=True)
    if moe:
        config = config.with_moe(expert_names=["a", "b"], router="linear")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep").write_text("old")
    with pytest.raises(UnsupportedModelError, match="parallel_blocks=true"):
        export_hf(Transformer(config), tmp_path / "hf")
    with pytest.raises(UnsupportedModelError, match="parallel_blocks"):
        hf_config(config, torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # untouched, no temporary left behind
    assert (tmp_path / "hf" / "keep").read_text() == "old"
