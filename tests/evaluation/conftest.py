"""Fixtures for the evaluation tests: a tiny byte-level BPE, two synthetic domains, and a tiny
dense model trained for a few steps on them (saved as a checkpoint with its tokenizer)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import tiny
from nexus.data.tokenizer import load_tokenizer, train_tokenizer
from nexus.model.transformer import Transformer, causal_lm_loss

WORDS = [
    "the",
    "a",
    "model",
    "expert",
    "routes",
    "tokens",
    "to",
    "its",
    "domain",
    "while",
    "shared",
    "layers",
    "keep",
    "general",
    "knowledge",
]
CODE = [
    "def {0}(x):\n    return x + {1}\n",
    "for {0} in range({1}):\n    print({0})\n",
    "class {0}:\n    value = {1}\n",
]


def _prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _code(rng: random.Random, n_lines: int) -> str:
    return "".join(
        rng.choice(CODE).format(rng.choice(["f", "g", "item", "node"]), rng.randint(0, 99))
        for _ in range(n_lines)
    )


def fit_model(model: Transformer, sample: Callable[[], torch.Tensor], steps: int, lr: float) -> Transformer:
    """A few AdamW steps on batches of (B, T + 1) tokens from `sample()`; returns the model in eval mode."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on shared cores
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = sample()
        loss = causal_lm_loss(model(batch[:, :-1]).logits, batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def fit():
    return fit_model


@pytest.fixture(scope="session")
def domain_texts() -> dict[str, list[str]]:
    """Held-out-style documents per domain; the last prose and code documents exceed 64 tokens."""
    rng = random.Random(0)
    return {"prose": [_prose(rng, n) for n in (4, 8, 12, 90)], "code": [_code(rng, n) for n in (1, 2, 3, 12)]}


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE with ~300 tokens trained on both domains."""
    rng = random.Random(1)
    corpus = [_prose(rng, 40) for _ in range(60)] + [_code(rng, 8) for _ in range(60)]
    return train_tokenizer(corpus, vocab_size=300, out_path=tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tokenizer, tokenizer_file):
    """A tiny dense model fitted for 40 steps on both domains, saved with tokenizer.json."""
    rng = random.Random(2)
    ids: list[int] = []
    for i in range(200):
        text = _prose(rng, 30) if i % 2 else _code(rng, 4)
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    T = 64

    def sample() -> torch.Tensor:
        starts = torch.randint(0, len(stream) - T - 1, (8,))
        return torch.stack([stream[s : s + T + 1] for s in starts])

    torch.manual_seed(0)
    model = fit_model(Transformer(tiny(vocab_size=len(tokenizer))), sample, steps=40, lr=3e-3)
    path = tmp_path_factory.mktemp("ckpt") / "dense"
    return save_checkpoint(model, path, extra_files={"tokenizer.json": tokenizer_file})


@pytest.fixture(scope="session")
def trained_model(trained_checkpoint):
    return load_checkpoint(trained_checkpoint)
