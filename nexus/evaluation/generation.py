"""Autoregressive decoding with the KV cache (`nexus.model.transformer.KVCache`), greedy or sampled.

`generate_tokens` feeds the prompt once (the prefill) and then only each new token, which attends
over the cached keys and values. Once the context fills the window (`max_seq_len`), every further
step reads the last `max_seq_len` tokens again without the cache: the window slides, so RoPE
positions restart at 0, which is what decoding without a cache does. Greedy output is therefore
the same with and without the cache (`use_cache=False` is the reference the tests compare with).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nexus.model.transformer import KVCache, Transformer


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, vocab) last-position logits -> (B,) token ids: argmax at temperature 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    use_cache: bool = True,
    max_context: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row of idx: (B, T), `max_new_tokens` times, each (B,).

    `max_context`: the window the model reads (default and at most `max_seq_len`)."""
    if max_new_tokens <= 0:
        return
    window_len = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
    weight = model.tok_emb.weight
    cache = KVCache(model.config, idx.shape[0], weight.device, weight.dtype) if use_cache else None
    window = idx[:, -window_len:]
    logits = model(window, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, generator)
        yield token
        if step + 1 == max_new_tokens:
            return
        window = torch.cat([window, token.unsqueeze(-1)], dim=1)[:, -window_len:]
        if cache is not None and cache.length < window_len:
            logits = model(token.unsqueeze(-1), cache=cache).logits[:, -1]
        else:
            logits = model(window).logits[:, -1]


def generate(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """idx: (B, T) -> (B, T + max_new_tokens): the prompt and its greedy (or sampled) continuation."""
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, use_cache, generator=generator))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
