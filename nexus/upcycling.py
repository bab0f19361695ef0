"""Upcycling operations: plain functions from models to models, no training inside.

- `upcycle`: seed + n dense experts (+ domain embeddings) -> MoE (Nexus or linear router).
- `merge_dense`: BTM-style parameter average -> one dense model.
- `sparse_upcycle`: one dense model's FFN copied into n experts, fresh linear router.
- `extend` / `remove_expert`: add or drop one routed expert of a trained MoE.

Parameters are addressed by state-dict name. In block i, `blocks.i.ffn.*` is the FFN (dense:
`w_in`/`w_out`; MoE: `shared.*`, `experts.*`, `router.*`); every other tensor is "non-FFN". With
attention experts (BAM), `blocks.i.attn.{experts,router,shared}.*` are per expert like the FFN's
(`nexus.attention_upcycling`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch

from nexus.attention_upcycling import (
    extend_attention,
    is_attention_expert_key,
    is_routed_attention_key,
    upcycle_attention,
)
from nexus.config import ModelConfig, MoEConfig
from nexus.errors import IncompatibleModelsError
from nexus.model.routers import get_router, router_param
from nexus.model.transformer import Transformer

_FFN_KEY = re.compile(r"^blocks\.(\d+)\.ffn\.")
LINEAR_ROUTER_MODES = ("append", "reset")
"""How `extend` treats a linear (`Router.resettable`) router: keep the trained rows and append a fresh one,
or re-draw all."""


def is_ffn_key(name: str) -> bool:
    return bool(_FFN_KEY.match(name))


def non_ffn_keys(model: Transformer) -> list[str]:
    """The tensors every expert has and the MoE shares: averaged by `upcycle`, λ-merged by `extend`."""
    return [
        k
        for k in model.state_dict()
        if not is_ffn_key(k) and not is_attention_expert_key(k) and k != "domain_embeddings"
    ]


def check_configs_compatible(
    reference: ModelConfig, others: Sequence[ModelConfig], names: Sequence[str]
) -> None:
    """Every config must share the reference's dense architecture; name the first that does not."""
    ref = reference.architecture()
    for name, config in zip(names, others):
        other = config.architecture()
        diff = [f"{k}={other[k]!r} (expected {ref[k]!r})" for k in ref if other[k] != ref[k]]
        if diff:
            raise IncompatibleModelsError(
                f"{name} does not match the reference architecture: " + ", ".join(diff)
            )


def check_compatible(reference: Transformer, others: Sequence[Transformer], names: Sequence[str]) -> None:
    check_configs_compatible(reference.config, [m.config for m in others], names)


def _check_domain_embeddings(domain_embeddings, router: str, n: int, dim: int | None = None) -> torch.Tensor:
    if domain_embeddings is None:
        raise IncompatibleModelsError(f"router={router!r} needs domain_embeddings of shape (n_experts, m)")
    d = torch.as_tensor(domain_embeddings, dtype=torch.float32)
    if d.ndim != 2 or d.shape[0] != n:
        raise IncompatibleModelsError(
            f"domain_embeddings has shape {tuple(d.shape)}; expected ({n}, m): one row per expert"
        )
    if dim is not None and d.shape[1] != dim:
        raise IncompatibleModelsError(
            f"domain embedding dimension {d.shape[1]} differs from the router's domain_embed_dim={dim}"
        )
    if not torch.isfinite(d).all():
        raise IncompatibleModelsError("domain_embeddings contain NaN or infinite values")
    return d


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`φ_moe = (1/n) Σ_i φ_i`, accumulated in fp32."""
    return (sum(t.float() for t in tensors) / len(tensors)).to(tensors[0].dtype)


def _set_ffn_slot(moe_state: dict, prefix: str, ffn_state: dict, expert: int | None) -> None:
    """Copy a dense FFN (`w_in.weight`, `w_out.weight`) into the shared expert or routed slot `expert`."""
    for proj in ("w_in", "w_out"):
        src = ffn_state[f"{prefix}ffn.{proj}.weight"]
        if expert is None:
            moe_state[f"{prefix}ffn.shared.{proj}.weight"].copy_(src)
        else:
            moe_state[f"{prefix}ffn.experts.{proj}"][expert].copy_(src)


@torch.no_grad()
def upcycle(
    seed: Transformer,
    experts: Sequence[Transformer],
    domain_embeddings: torch.Tensor | None = None,
    router: str = "nexus",
    expert_names: Sequence[str] | None = None,
    init_seed: int = 0,
    **moe_options,
) -> Transformer:
    """Combine a seed and n dense experts into one MoE (paper §3, "Upcycling").

    Per block: shared expert = the seed's FFN; routed experts = the experts' FFNs (in order);
    every non-FFN parameter `φ_moe = (1/n) Σ_i φ_i`. The router is freshly initialised (from
    `init_seed`: the same inputs always give the same MoE); a router that reads domain embeddings (Nexus)
    additionally stores `domain_embeddings` (n, m), one row per expert.

    `attention_experts="full"` or `"shared_kv"` (BAM; a `MoEConfig` option like every keyword in
    `moe_options`) makes expert e's attention attention expert e instead of averaging it (`shared_kv`:
    its Q and O; K and V are averaged) and, with `attention_shared_expert=True`, the seed's attention
    the always-on one (`nexus.attention_upcycling`)."""
    if not experts:
        raise IncompatibleModelsError("upcycle needs at least one dense expert (got n=0)")
    if seed.config.is_moe:
        raise IncompatibleModelsError("the seed must be a dense model, got an MoE")
    names = list(expert_names) if expert_names is not None else [f"expert_{i}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise IncompatibleModelsError(f"{len(names)} expert names for {len(experts)} experts")
    check_compatible(seed, experts, [f"expert {i} ({name!r})" for i, name in enumerate(names)])
    if get_router(router).uses_domain_embeddings:
        domain_embeddings = _check_domain_embeddings(domain_embeddings, router, len(experts))
        moe_options.setdefault("domain_embed_dim", domain_embeddings.shape[1])
    moe = _new_model(seed.config.with_moe(expert_names=names, router=router, **moe_options), seed, init_seed)

    state = moe.state_dict()
    seed_state = seed.state_dict()
    expert_states = [e.state_dict() for e in experts]
    for key in non_ffn_keys(moe):
        state[key].copy_(_mean([s[key] for s in expert_states]))
    for i in range(seed.config.n_layers):
        prefix = f"blocks.{i}."
        if moe.config.moe.shared_expert:
            _set_ffn_slot(state, prefix, seed_state, None)
        for e, expert_state in enumerate(expert_states):
            _set_ffn_slot(state, prefix, expert_state, e)
    upcycle_attention(state, seed_state, expert_states, seed.config.n_layers)
    if moe.domain_embeddings is not None:
        moe.domain_embeddings.copy_(domain_embeddings)
    return moe


@torch.no_grad()
def merge_dense(
    seed: Transformer, experts: Sequence[Transformer], weights: Sequence[float] | None = None
) -> Transformer:
    """Branch-Train-Merge baseline: one dense model whose every parameter is the (weighted, by
    default uniform) average over the seed and the experts."""
    if not experts:
        raise IncompatibleModelsError("merge_dense needs at least one dense expert (got n=0)")
    models = [seed, *experts]
    check_compatible(seed, experts, [f"expert {i}" for i in range(len(experts))])
    w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float32)
    if w.shape != (len(models),) or (w < 0).any() or w.sum() <= 0:
        raise IncompatibleModelsError(f"merge weights must be {len(models)} non-negative values (seed first)")
    w = w / w.sum()
    merged = _new_model(seed.config, seed, 0)  # every tensor is overwritten below
    states = [m.state_dict() for m in models]
    for key, tensor in merged.state_dict().items():
        tensor.copy_(sum(wi * s[key].float() for wi, s in zip(w.tolist(), states)))
    return merged


@torch.no_grad()
def sparse_upcycle(
    dense: Transformer,
    n_experts: int,
    top_k: int = 1,
    shared_expert: bool = False,
    init_seed: int = 0,
    **moe_options,
) -> Transformer:
    """Sparse upcycling (Komatsuzaki et al., 2023): every routed expert starts as a copy of the dense
    FFN, all other weights are kept, and a linear router is initialised from scratch."""
    if n_experts < 1:
        raise IncompatibleModelsError(f"sparse_upcycle needs n_experts >= 1, got {n_experts}")
    names = [f"expert_{i}" for i in range(n_experts)]
    return upcycle(
        dense,
        [dense] * n_experts,
        router="linear",
        expert_names=names,
        top_k=top_k,
        shared_expert=shared_expert,
        init_seed=init_seed,
        **moe_options,
    )


def _new_model(config: ModelConfig, like: Transformer, init_seed: int) -> Transformer:
    """A model for `config` on `like`'s device and dtype. Its initial values (kept only where nothing
    is copied in: the router) come from `init_seed` through a private generator, so builds running
    in parallel threads (the flows' upcycling tasks) stay deterministic."""
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG: leave it as it was
        model = Transformer(config)
    model.reinit_(torch.Generator().manual_seed(init_seed))
    return model.to(device=like.tok_emb.weight.device, dtype=like.tok_emb.weight.dtype)


def _resized_moe(moe: Transformer, names: list[str], init_seed: int = 0) -> Transformer:
    cfg = dataclasses.replace(moe.config, moe=dataclasses.replace(moe.config.moe, expert_names=names))
    return _new_model(cfg, moe, init_seed)


def _check_moe(moe: Transformer) -> MoEConfig:
    if not moe.config.is_moe:
        raise IncompatibleModelsError("expected an MoE model, got a dense one")
    return moe.config.moe


@torch.no_grad()
def extend(
    moe: Transformer,
    new_expert: Transformer,
    domain_embedding: torch.Tensor | None = None,
    name: str | None = None,
    lam: float | None = None,
    init_seed: int = 0,
    linear_router: str = "append",
) -> Transformer:
    """Append one dense expert to a trained MoE (paper §3, "Efficient adaptation to new domains").

    The new expert's FFN is appended to every block's routed experts; old experts, the shared
    expert and the Nexus projection are untouched (the router needs no restart: `e_new = P_r(d_new)`).
    Non-FFN parameters become `φ_f = (1 − λ) · φ_moe + λ · φ_new` with `λ = 1/(n+1)` by default.
    A linear router keeps its trained rows and gets a freshly initialised one for the new expert
    (`linear_router="append"`), or is re-initialised whole (`"reset"`: the paper's baseline, §5.2
    "the router weights are reset after extending the MoE layers"); fresh rows come from `init_seed`.
    With attention experts, the new expert's attention is appended as an attention expert and the old
    ones are untouched; only what stays shared (e.g. the averaged K/V of `shared_kv`) is λ-merged."""
    mcfg = _check_moe(moe)
    n = mcfg.n_experts
    name = name if name is not None else f"expert_{n}"
    if name in mcfg.expert_names:
        raise IncompatibleModelsError(f"the MoE already has an expert named {name!r}")
    if new_expert.config.is_moe:
        raise IncompatibleModelsError(f"new expert {name!r} must be a dense model, got an MoE")
    check_compatible(moe, [new_expert], [f"new expert {name!r}"])
    lam = 1.0 / (n + 1) if lam is None else float(lam)
    if not 0.0 <= lam <= 1.0:
        raise IncompatibleModelsError(f"lambda must be in [0, 1], got {lam}")
    if linear_router not in LINEAR_ROUTER_MODES:
        raise IncompatibleModelsError(
            f"linear_router must be one of {LINEAR_ROUTER_MODES}, got {linear_router!r}"
        )
    router = get_router(mcfg.router)
    reset = router.resettable and linear_router == "reset"

    out = _resized_moe(moe, [*mcfg.expert_names, name], init_seed)
    state, old, new = out.state_dict(), moe.state_dict(), new_expert.state_dict()
    for key in non_ffn_keys(moe):
        state[key].copy_(((1 - lam) * old[key].float() + lam * new[key].float()).to(old[key].dtype))
    for key, tensor in old.items():
        if not is_ffn_key(key):
            continue
        if reset and router_param(key) is not None:
            continue  # every router tensor stays as `_resized_moe` drew it
        if ".ffn.experts." in key or router.has_expert_rows(key):
            state[key][:n].copy_(tensor)  # old rows; row n is the new expert / fresh router row
        else:
            state[key].copy_(tensor)  # shared expert, router parameters shared by all experts
    for i in range(moe.config.n_layers):
        _set_ffn_slot(state, f"blocks.{i}.", new, n)
    extend_attention(state, old, new, n, moe.config.n_layers, router.has_expert_rows)
    if router.uses_domain_embeddings:
        d_new = _check_domain_embeddings(
            None if domain_embedding is None else torch.as_tensor(domain_embedding).reshape(1, -1),
            mcfg.router,
            1,
            mcfg.domain_embed_dim,
        )
        out.domain_embeddings.copy_(torch.cat([moe.domain_embeddings, d_new.to(moe.domain_embeddings)]))
    return out


@torch.no_grad()
def remove_expert(moe: Transformer, expert: str | int) -> Transformer:
    """Drop one routed expert: its FFN slice (and attention expert), its domain embedding / router rows.
    Shared weights are kept as they are (an `extend` merge cannot be undone)."""
    mcfg = _check_moe(moe)
    idx = (
        mcfg.expert_names.index(expert) if isinstance(expert, str) and expert in mcfg.expert_names else expert
    )
    if not isinstance(idx, int) or not 0 <= idx < mcfg.n_experts:
        raise IncompatibleModelsError(f"no expert {expert!r}; experts are {mcfg.expert_names}")
    if mcfg.n_experts == 1:
        raise IncompatibleModelsError("cannot remove the last routed expert")
    if mcfg.top_k > mcfg.n_experts - 1:
        raise IncompatibleModelsError(
            f"top_k={mcfg.top_k} would exceed the {mcfg.n_experts - 1} remaining experts"
        )
    keep = [i for i in range(mcfg.n_experts) if i != idx]
    out = _resized_moe(moe, [mcfg.expert_names[i] for i in keep])
    state = out.state_dict()
    router = get_router(mcfg.router)
    for key, tensor in moe.state_dict().items():
        per_expert = ".ffn.experts." in key or router.has_expert_rows(key) or is_routed_attention_key(key)
        state[key].copy_(tensor[keep] if per_expert else tensor)
    return out
