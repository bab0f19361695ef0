"""The model card: what it says with and without metadata and evaluations."""

from nexus.config import tiny
from nexus.interop.hf_format import LLAMA
from nexus.interop.model_card import model_card


def test_a_bare_dense_card_says_what_is_not_recorded():
    card = model_card(tiny(parallel_blocks=False), LLAMA, {}, {"total": 1234})
    assert card.startswith('---\nlibrary_name: "transformers"')
    assert "`LlamaForCausalLM`" in card and "trust_remote_code" not in card and "## Experts" not in card
    assert "| parameters (total) | 1,234 |" in card
    for section in ("## Training data", "## Lineage"):
        assert card.split(section, 1)[1].lstrip().startswith("Not recorded")
    assert "No evaluation recorded" in card
