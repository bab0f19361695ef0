"""Export to transformers, every Nexus variant: logits and greedy generation equal ours, whether the
export is a transformers architecture (Llama, Qwen2, Qwen2-MoE) or the remote-code NexusForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

from nexus.checkpoint import save_checkpoint
from nexus.errors import CheckpointError
from nexus.evaluation.generation import generate
from nexus.interop import NEXUS, export_checkpoint, export_hf
from tests.interop import (
    N_EXPERTS,
    NEXUS_TOP1,
    VARIANTS,
    nexus_model,
    rel_err,
    tokens,
    variant_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def load_hf(directory, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_logits_and_greedy_generation_equal_ours(tmp_path, name):
    model, remote, arch = variant_model(name)
    hf = load_hf(export_hf(model, tmp_path / "hf", remote_code=remote))
    assert type(hf).__name__ == arch
    assert (tmp_path / "hf" / "modeling_nexus.py").is_file() == (arch == NEXUS)
    idx = tokens(length=20)
    with torch.no_grad():
        ours = model(idx)
        assert rel_err(ours.logits, hf(idx).logits) < 1e-5
    prompt = idx[:, :8]
    greedy = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    assert greedy.shape == (2, 40)
    assert torch.equal(greedy, generate(model, prompt, 32))
    for info in ours.routing:  # every expert gets tokens, and the gate values matter (not 0/1)
        assert (torch.bincount(info.expert_index.flatten(), minlength=N_EXPERTS) > 0).all()
        assert 0.4 < info.probs.max(-1).values.mean() < 0.95


def test_demo_nexus_moe_exports_and_loads(tmp_path):
    """The demo's architecture (conf/experiment/demo.yaml: parallel blocks, 4 domains, top-1, shared
    expert, 384-dim domain embeddings, its 2048-token vocabulary) through `nexus export`'s code path."""
    from flows.config import compose
    from nexus.data.presets import demo_config
    from nexus.model.transformer import Transformer
    from nexus.upcycling import upcycle

    cfg = compose("demo")
    names = [d.name for d in demo_config().domains if not d.held_out]
    config = cfg.model.__class__(
        **{**cfg.model.to_dict(), "moe": None, "vocab_size": cfg.data.tokenizer.vocab_size}
    )
    torch.manual_seed(0)
    seed = Transformer(config)
    experts = [Transformer(config).reinit_(torch.Generator().manual_seed(i)) for i in range(len(names))]
    moe = upcycle(
        seed,
        experts,
        domain_embeddings=torch.randn(len(names), 384),
        router="nexus",
        expert_names=names,
        **cfg.router.moe_kwargs(),
    ).eval()
    assert moe.config.parallel_blocks and moe.config.moe.top_k == 1 and moe.config.moe.shared_expert
    out = export_checkpoint(save_checkpoint(moe, tmp_path / "moe"), tmp_path / "hf")
    hf = load_hf(out)
    assert type(hf).__name__ == NEXUS and hf.config.expert_names == names
    idx = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    with torch.no_grad():
        assert rel_err(moe(idx).logits, hf(idx).logits) < 1e-5
    prompt = idx[:, :16]
    assert torch.equal(hf.generate(prompt, max_new_tokens=32, do_sample=False), generate(moe, prompt, 32))


def test_shared_expert_scaling_is_exact_in_bf16(tmp_path):
    """The doubled down_proj times sigmoid(0) = 0.5 is bit-exact, not just close: bf16 would show it."""
    moe = nexus_model(False, {"router": "linear", "top_k": 1}).to(torch.bfloat16)
    hf = load_hf(export_hf(moe, tmp_path / "hf"))
    assert hf.dtype == torch.bfloat16
    shared = moe.blocks[0].ffn.shared
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mlp = hf.model.layers[0].mlp
    with torch.no_grad():
        theirs = torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
        assert torch.equal(theirs, shared(x))


def test_export_directory_is_hub_ready(tmp_path):
    """Tokenizer (a bare Nexus tokenizer.json gets its tokenizer_config.json), generation config and
    model card; what `push_to_hub` uploads (save_pretrained of the loaded model) loads again."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from nexus.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [f"the expert number {i} routes tokens to its domain" for i in range(50)]
    tok_file = train_tokenizer(texts, vocab_size=96, out_path=tmp_path / "tokenizer.json")
    model = nexus_model(True, NEXUS_TOP1)
    ckpt = save_checkpoint(
        model,
        tmp_path / "moe",
        extra_files={"tokenizer.json": tok_file},
        metadata={
            "experiment": "demo",
            "domains": ["a", "b", "c"],
            "metrics": {"val_loss": 2.5},
            "data": {"weights": {"expert_0": 0.5, "expert_1": 0.25, "expert_2": 0.25}},
        },
    )
    results = {
        "results": {
            "nexus_heldout_code": {
                "alias": "code",
                "byte_perplexity,none": 1.75,
                "byte_perplexity_stderr,none": "N/A",
            }
        }
    }
    out = export_checkpoint(ckpt, tmp_path / "hf", results=[results])

    ours, theirs = load_tokenizer(tok_file), AutoTokenizer.from_pretrained(out)
    text = "the expert number 7 routes <|endoftext|> tokens"
    assert theirs.encode(text) == ours.encode(text)  # special-token text stays text, no BOS added
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eos_token_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ours.eos_token_id

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "mixture-of-experts" in card.data.tags
    for text in (
        "NexusForCausalLM",
        "trust_remote_code=True",
        "| 0 | expert_0 | 0.5 |",
        "| val_loss | 2.5 |",
        "| nexus_heldout_code | byte_perplexity | 1.75 |",
        str(ckpt.resolve()),
    ):
        assert text in card.text, text

    hf = load_hf(out)
    hf.save_pretrained(tmp_path / "pushed")
    assert (tmp_path / "pushed" / "modeling_nexus.py").is_file()
    again = load_hf(tmp_path / "pushed")
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf(idx).logits)


def test_failed_export_leaves_the_directory_as_it_was(tmp_path):
    model = nexus_model(True)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{not json")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep").write_text("old")
    with pytest.raises(CheckpointError, match="tokenizer.json: corrupt JSON"):
        export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary left behind
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep"]
