"""The attention-expert part (BAM) of `upcycle`, `extend` and `remove_expert` (`nexus.upcycling`).

In block i of an MoE with attention experts (`nexus.model.attention_experts`):
- `attn.experts.<wq|wk|wv|wo|bq|bk|bv>` stack one slice per routed expert (dim 0), upcycled from each
  dense expert's `attn.<wq|wk|wv|wo>.<weight|bias>`;
- `attn.shared.*` is the optional always-on attention expert, the seed's attention;
- `attn.router.*` routes them (a linear router has one row per expert: `Router.has_expert_rows`);
- `shared_kv` only: `attn.wk`, `attn.wv`, the one key/value projection, keep the dense names, so
  `upcycle` averages them and `extend` λ-merges them with every other shared tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from nexus.model.attention_experts import DENSE_NAMES

_EXPERT_KEY = re.compile(r"^blocks\.\d+\.attn\.(experts|router|shared)\.")


def is_attention_expert_key(name: str) -> bool:
    """A tensor of the attention experts or their router: neither averaged nor λ-merged."""
    return bool(_EXPERT_KEY.match(name))


def is_routed_attention_key(name: str) -> bool:
    """A stacked tensor with one slice per routed attention expert (dim 0)."""
    return ".attn.experts." in name


def set_attention_slot(state: dict, prefix: str, dense_state: dict, expert: int | None) -> None:
    """Copy a dense model's attention (block `prefix`) into routed attention expert `expert`, or into the
    shared attention expert (None); tensors the MoE does not have (e.g. shared K/V) are skipped."""
    for name, dense in DENSE_NAMES.items():
        key = f"{prefix}attn.shared.{dense}" if expert is None else f"{prefix}attn.experts.{name}"
        if key in state:
            target = state[key] if expert is None else state[key][expert]
            target.copy_(dense_state[f"{prefix}attn.{dense}"])


@torch.no_grad()
def upcycle_attention(state: dict, seed_state: dict, expert_states: list[dict], n_layers: int) -> None:
    """Attention expert e = dense expert e's attention; the shared attention expert = the seed's."""
    for i in range(n_layers):
        set_attention_slot(state, f"blocks.{i}.", seed_state, None)
        for e, expert_state in enumerate(expert_states):
            set_attention_slot(state, f"blocks.{i}.", expert_state, e)


@torch.no_grad()
def extend_attention(
    state: dict, old: dict, new_state: dict, n: int, n_layers: int, has_expert_rows: Callable[[str], bool]
) -> None:
    """The n old attention experts, their router rows, projection and the shared expert as they were;
    the new expert's attention appended as attention expert n (a router row of expert n, e.g. a linear
    router's, stays as initialised in `state`). `has_expert_rows`: the MoE's `Router.has_expert_rows`."""
    for key, tensor in old.items():
        if not is_attention_expert_key(key):
            continue
        if is_routed_attention_key(key) or has_expert_rows(key):
            state[key][:n].copy_(tensor)
        else:
            state[key].copy_(tensor)
    for i in range(n_layers):
        set_attention_slot(state, f"blocks.{i}.", new_state, n)
